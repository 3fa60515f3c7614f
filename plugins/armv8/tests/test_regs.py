"""Pure logic: arm64 ONE_REG id encoding and decoding (runs on any host)."""

from __future__ import annotations

import pytest
from kvmfw_armv8 import regs


def test_core_ids_match_the_kernel_layout() -> None:
    # values from <asm/kvm.h> offsets: KVM_REG_ARM_CORE_REG(regs.regs[0]) etc.
    assert regs.X_IDS[0] == 0x6030000000100000
    assert regs.X_IDS[30] == 0x603000000010003C
    assert regs.SP_EL0_ID == 0x603000000010003E
    assert regs.PC_ID == 0x6030000000100040
    assert regs.PSTATE_ID == 0x6030000000100042
    assert regs.SP_EL1_ID == 0x6030000000100044
    assert regs.ELR_EL1_ID == 0x6030000000100046
    assert regs.SPSR_IDS[4] == 0x6030000000100050
    assert regs.V_IDS[0] == 0x6040000000100054
    assert regs.V_IDS[31] == 0x60400000001000D0
    assert regs.FPSR_ID == 0x60200000001000D4
    assert regs.FPCR_ID == 0x60200000001000D5
    assert len(regs.CORE_IDS) == 31 + 3 + 2 + 5 + 32 + 2


def test_sysreg_encoding_round_trips() -> None:
    rid = regs.sysreg(3, 0, 1, 0, 0)
    assert rid == 0x603000000013C080  # SCTLR_EL1 as KVM lists it
    assert regs.sysreg_fields(rid) == (3, 0, 1, 0, 0)
    assert regs.decode(rid).name == "SCTLR_EL1"
    assert regs.MPIDR_EL1 == 0x603000000013C005
    for name, rid in regs.SYSREG_BY_NAME.items():
        assert regs.decode(rid).name == name
        assert regs.id_of(name) == rid


def test_sysreg_field_ranges_are_checked() -> None:
    with pytest.raises(ValueError):
        regs.sysreg(4, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        regs.sysreg_fields(regs.PC_ID)


def test_timer_ids_carry_kvms_swapped_encodings() -> None:
    assert regs.KVM_REG_ARM_TIMER_CNT == 0x603000000013DF1A
    assert regs.KVM_REG_ARM_TIMER_CVAL == 0x603000000013DF02
    assert regs.KVM_REG_ARM_TIMER_CTL == 0x603000000013DF19
    assert regs.name_of(regs.KVM_REG_ARM_TIMER_CNT) == "CNTVCT_EL0"
    assert regs.name_of(regs.KVM_REG_ARM_TIMER_CVAL) == "CNTV_CVAL_EL0"


def test_unknown_ids_decode_without_loss() -> None:
    unnamed = regs.sysreg(3, 5, 11, 9, 6)
    info = regs.decode(unnamed)
    assert (info.kind, info.name) == ("sysreg", "S3_5_C11_C9_6")
    alien = 0x4030000000001234  # another arch's id
    assert regs.decode(alien).kind == "unknown"
    assert "0x4030000000001234" in regs.decode(alien).name
    odd = 0x6030000000990001  # an arm64 coprocessor group KVM does not define (yet)
    assert regs.decode(odd).kind == "unknown"


def test_firmware_demux_and_sve_ids() -> None:
    assert regs.KVM_REG_ARM_PSCI_VERSION == 0x6030000000140000
    assert regs.decode(regs.KVM_REG_ARM_PSCI_VERSION).name == "KVM_REG_ARM_PSCI_VERSION"
    assert regs.decode(0x6030000000160000).name == "KVM_REG_ARM_STD_BMAP"
    assert regs.decode(0x6020000000110002).name == "CCSIDR[2]"
    assert regs.decode(regs.KVM_REG_ARM64_SVE_VLS).name == "KVM_REG_ARM64_SVE_VLS"
    z3 = regs.KVM_REG_ARM64 | regs.KVM_REG_ARM64_SVE | regs.KVM_REG_SIZE_U2048 | (3 << 5)
    assert regs.decode(z3).name == "Z3[0]"
    assert regs.reg_size(z3) == 256
    p1 = regs.KVM_REG_ARM64 | regs.KVM_REG_ARM64_SVE | 0x0050000000000000 | 0x400 | (1 << 5)
    assert regs.decode(p1).name == "P1[0]"
    ffr = regs.KVM_REG_ARM64 | regs.KVM_REG_ARM64_SVE | 0x0050000000000000 | 0x600
    assert regs.decode(ffr).name == "FFR[0]"


def test_sizes() -> None:
    assert regs.reg_size(regs.PC_ID) == 8
    assert regs.reg_size(regs.V_IDS[0]) == 16
    assert regs.reg_size(regs.FPSR_ID) == 4
    assert regs.KVM_REGS_SIZE == 864  # sizeof(struct kvm_regs) on arm64

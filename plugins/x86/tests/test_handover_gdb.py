"""The GDB stub stepping on the emulated CPU (issue 15 item 4): ``monitor emulate on`` makes
each single step one exact instruction under Unicorn, without entering KVM; the guest then
continues on KVM to its normal end."""

from __future__ import annotations

import pytest
from test_gdb import STATUS, Client, Kvmfw, _start, symbols

pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra (unicorn)")
capstone = pytest.importorskip("capstone", reason="needs the 'emu' extra (capstone)")

RIP = 16  # in the i386:x86-64 description: rax..r15, then rip


def test_single_steps_on_the_emulated_cpu_then_continue_on_kvm() -> None:
    k = Kvmfw()
    try:
        c = Client(k.port)
        _start(c)
        start = symbols()["_start"]
        assert c.register(RIP) == start
        code = bytes.fromhex(c.cmd(b"m%x,40" % start).decode())
        cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        expected = [i.address for i in cs.disasm(code, start)][:7]
        assert "emulated CPU" in c.monitor("emulate on")
        assert "now on" in c.monitor("info")
        pcs = [c.register(RIP)]
        for _ in range(6):
            assert c.cmd(b"vCont;s:1").startswith(b"T05thread:1;")
            pcs.append(c.register(RIP))
        assert pcs == expected  # one instruction per step, in the guest's order
        assert c.cmd(b"s").startswith(b"T05")  # the plain step packet too
        assert c.register(RIP) == [i.address for i in cs.disasm(code, start)][7]
        assert "KVM" in c.monitor("emulate off")
        c.send(b"c")  # the rest on KVM: the guest computes its normal result
        rc, err = k.finish()
    finally:
        k.kill()
    assert rc == STATUS, err
    assert "Traceback" not in err

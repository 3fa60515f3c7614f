"""kvmfw.abi.ioctl reissues a call a signal interrupted (EINTR), except KVM_RUN.

A sweep worker once saw ``KVM_CREATE_VM failed: EINTR``: a kick or run-timer signal landed
on a thread that had run a vCPU while it created the next VM. The raw call is replaced
here by one that is interrupted on cue; what is checked is the wrapper's decision."""

from __future__ import annotations

import errno

import pytest

import kvmfw.abi as abi
from kvmfw.abi import IOCTLS, ioctl
from kvmfw.errors import KvmError


def interrupted(times: int, then: int = 7) -> tuple[list[int], object]:
    calls: list[int] = []

    def raw(fd: int, request: int, arg: int) -> int:
        calls.append(request)
        return -errno.EINTR if len(calls) <= times else then

    return calls, raw


def test_an_interrupted_call_is_issued_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, raw = interrupted(3)
    monkeypatch.setattr(abi, "_raw_ioctl", raw)
    assert ioctl(5, IOCTLS.KVM_CREATE_VM, 0) == 7
    assert calls == [IOCTLS.KVM_CREATE_VM] * 4


def test_kvm_run_is_not_reissued_its_eintr_is_the_kick(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    calls, raw = interrupted(1)
    monkeypatch.setattr(abi, "_raw_ioctl", raw)
    with pytest.raises(KvmError, match="KVM_RUN"):
        ioctl(5, IOCTLS.KVM_RUN, 0)
    assert len(calls) == 1


def test_a_call_interrupted_every_time_ends_in_a_typed_error(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    calls, raw = interrupted(10 ** 6)
    monkeypatch.setattr(abi, "_raw_ioctl", raw)
    with pytest.raises(KvmError) as exc:
        ioctl(5, IOCTLS.KVM_CREATE_VM, 0, "vm")
    assert exc.value.errno == errno.EINTR
    assert len(calls) == abi.EINTR_RETRIES + 1


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def raw(fd: int, request: int, arg: int) -> int:
        calls.append(request)
        return -errno.EINVAL

    monkeypatch.setattr(abi, "_raw_ioctl", raw)
    with pytest.raises(KvmError):
        ioctl(5, IOCTLS.KVM_CREATE_VM, 0)
    assert len(calls) == 1

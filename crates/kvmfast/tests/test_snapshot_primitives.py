"""The primitives a snapshot is built from (issue 17; KVM API document: 4.3
KVM_GET_MSR_INDEX_LIST, 4.18/4.19 KVM_GET/SET_MSRS, 4.32/4.33 KVM_GET/SET_DEBUGREGS,
4.46 KVM_GET_CPUID2, KVM_GET_TSC_KHZ, KVM_KVMCLOCK_CTRL, 4.48/4.49 KVM_GET/SET_CLOCK):
a flat guest's vCPU and RAM moved mid-run into a fresh VM ends as an uninterrupted run."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest
from emulation_support import RAM_SIZE, Guest, make_guest
from kvmfast_guest_support import (
    CODE_AT,
    STACK_TOP,
    VcpuThread,
    boot_guest,
    wait_until,
    wait_until_in_kvm_run,
)

from kvmfast import EventLoop, ExitSink, Kvm, KvmError, Vcpu, VirtioDevice, VirtioError, Vm
from kvmfast.testing import setup_long_mode

pytestmark = pytest.mark.kvm

EXIT_PORT = 0xF4
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_TSC = 0x10
LIMIT = 20_000
XSAVE_XMM = 160

# Counts in r12 and in memory; folds in XMM (PADDD, completed by kvmfast at CPL 0), a
# debug register (MOV from DR0) and an MSR (RDMSR of STAR) every round, so that a move
# that lost any of them ends differently.
COUNTER = f"""
.global entry, again, counter
entry:
    xor r12d, r12d
    lea rsi, [rip + counter]
again:
    inc r12
    add [rsi], r12
    paddd xmm0, xmm1
    mov rbx, dr0
    add r8, rbx
    mov ecx, {MSR_STAR:#x}
    rdmsr
    add r9, rax
    add r10, rdx
    cmp r12, {LIMIT}
    jne again
    out {EXIT_PORT:#x}, al
    .balign 8
counter: .quad 0
"""


def _prepared(kvm: Kvm) -> Guest:
    guest = make_guest(kvm, COUNTER)
    vcpu = guest.vcpu
    area = bytearray(vcpu.get_xsave())
    area[XSAVE_XMM : XSAVE_XMM + 32] = bytes(range(1, 17)) + struct.pack("<4I", 3, 5, 7, 11)
    struct.pack_into("<Q", area, 512, struct.unpack_from("<Q", area, 512)[0] | 3)
    vcpu.set_xsave(bytes(area))
    vcpu.set_debugregs({"db": [0x1234_5678, 0, 0, 0]})
    vcpu.set_msrs({MSR_STAR: 0x0023_0010_DEAD_BEEF, MSR_LSTAR: 0xFFFF_8000_0000_1000})
    return guest


def _counter(vm: Vm, guest: Guest) -> int:
    value: int = struct.unpack("<Q", vm.read(guest.symbols["counter"], 8))[0]
    return value


def _move(kvm: Kvm, source: Guest) -> tuple[Vm, Vcpu]:
    """A fresh VM holding the source's RAM and vCPU state, restored in the order of
    issue 17 (CPUID, MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC after
    sregs, MSRs, vCPU events last)."""
    old = source.vcpu
    vm = kvm.create_vm()
    vm.add_memory(0, RAM_SIZE)
    vm.write(0, source.vm.read(0, RAM_SIZE))
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vm.set_clock(source.vm.get_clock()["clock"])
    vcpu = vm.create_vcpu(0)
    msrs = old.save_msrs(kvm.msr_index_list())
    assert MSR_STAR in msrs and MSR_IA32_TSC in msrs
    vcpu.set_cpuid(old.get_cpuid())
    vcpu.set_mp_state(old.get_mp_state())
    vcpu.set_regs(old.get_regs())
    vcpu.set_sregs(old.get_sregs())
    vcpu.set_xsave(old.get_xsave())
    vcpu.set_xcrs(old.get_xcrs())
    vcpu.set_debugregs(old.get_debugregs())
    vcpu.set_lapic(old.get_lapic())
    vcpu.set_msrs(msrs)
    vcpu.set_vcpu_events(old.get_vcpu_events())
    return vm, vcpu


def test_a_guest_moved_mid_run_ends_as_an_uninterrupted_run(kvm: Kvm) -> None:
    whole = _prepared(kvm)
    assert whole.vcpu.run().reason == "device_exit"

    moved = _prepared(kvm)
    running = VcpuThread(moved.vcpu)
    wait_until_in_kvm_run(moved.vcpu)
    assert wait_until(lambda: _counter(moved.vm, moved) > 0)
    moved.vcpu.kicker().pause()
    assert running.join().reason == "paused"
    at = moved.vcpu.get_regs()["r12"]
    assert 0 < at < LIMIT, "the pause came after the end: nothing was moved mid-run"
    vm, vcpu = _move(kvm, moved)
    moved.vm.close()
    assert vcpu.run().reason == "device_exit"

    assert vcpu.get_regs() == whole.vcpu.get_regs()
    xmm = slice(XSAVE_XMM, XSAVE_XMM + 256)
    assert vcpu.get_xsave()[xmm] == whole.vcpu.get_xsave()[xmm]
    assert vcpu.get_debugregs() == whole.vcpu.get_debugregs()
    assert vm.read(0, RAM_SIZE) == whole.vm.read(0, RAM_SIZE)
    assert _counter(vm, moved) == LIMIT * (LIMIT + 1) // 2


def test_save_msrs_leaves_out_what_kvm_refuses(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_STAR: 0x1234})
    unknown = 0xDEADBEEF
    values = vcpu.save_msrs([MSR_IA32_SYSENTER_CS, unknown, MSR_STAR, unknown + 1])
    assert values == {MSR_IA32_SYSENTER_CS: 0x10, MSR_STAR: 0x1234}
    assert vcpu.save_msrs([unknown]) == {}
    with pytest.raises(KvmError, match="0xdeadbeef"):
        vcpu.get_msrs([MSR_IA32_SYSENTER_CS, unknown])


def test_set_msrs_names_the_first_refused_msr_and_sets_those_before_it(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    with pytest.raises(KvmError, match="0xdeadbeef") as refused:
        vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x33, 0xDEADBEEF: 1, MSR_STAR: 0x99})
    assert refused.value.errno is not None
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS, MSR_STAR]) == {
        MSR_IA32_SYSENTER_CS: 0x33,
        MSR_STAR: 0,
    }


def test_msr_index_list_is_what_kvm_reads(kvm: Kvm) -> None:
    indices = kvm.msr_index_list()
    assert MSR_IA32_TSC in indices and MSR_STAR in indices
    assert len(set(indices)) == len(indices)
    vcpu = kvm.create_vm().create_vcpu(0)
    vcpu.set_cpuid(kvm.supported_cpuid())
    assert set(vcpu.save_msrs(indices)) <= set(indices)


def test_debugregs_round_trip_and_bad_dicts(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    before = vcpu.get_debugregs()
    assert set(before) == {"db", "dr6", "dr7", "flags"} and len(before["db"]) == 4
    assert before["dr7"] == 0x400  # the reset value (SDM Vol. 3B 18.2.4)
    vcpu.set_debugregs({"db": [1, 2, 3, 4], "dr7": 0x401})
    after = vcpu.get_debugregs()
    assert after["db"] == [1, 2, 3, 4] and after["dr7"] == 0x401
    assert after["dr6"] == before["dr6"]
    with pytest.raises(ValueError, match="4 values"):
        vcpu.set_debugregs({"db": [1, 2]})
    with pytest.raises(ValueError, match="no field"):
        vcpu.set_debugregs({"dr5": 1})  # type: ignore[typeddict-unknown-key]
    assert vcpu.get_debugregs() == after


def test_get_cpuid_returns_what_was_set(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    assert vcpu.get_cpuid() == []
    supported = kvm.supported_cpuid()
    vcpu.set_cpuid(supported)
    got = vcpu.get_cpuid()
    assert len(got) == len(supported)
    # KVM keeps the leaves, some bits it manages itself (leaf 1 ECX/EBX: ../shared/HOST-KVM.md).
    assert {(e[0], e[1]) for e in got} == {(e[0], e[1]) for e in supported}


def test_tsc_khz_and_kvmclock(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    assert vcpu.tsc_khz() > 100_000  # any host of this century: above 100 MHz
    # No guest has written MSR_KVM_SYSTEM_TIME_NEW: KVM answers EINVAL.
    assert vcpu.kvmclock_ctrl() is False
    first = vm.get_clock()
    assert set(first) == {"clock", "flags"}
    time.sleep(0.01)
    assert vm.get_clock()["clock"] - first["clock"] >= 10_000_000
    vm.set_clock(1 << 40)
    assert 1 << 40 <= vm.get_clock()["clock"] < (1 << 40) + 1_000_000_000


# ---- guest RAM to and from a memory file ------------------------------------------------

PAGE = 4096
FILE_RAM = 4 << 20
MARK_AT = 0x20_0000
# Stores rax at MARK_AT and leaves: each VM's guest writes its own value.
MARKER = f"""
.global entry
entry:
    mov rbx, {MARK_AT:#x}
    mov [rbx], rax
    out {EXIT_PORT:#x}, al
"""


def _saved_guest(kvm: Kvm, path: Path) -> None:
    """A memory file holding MARKER's code, page tables and GDT (a sparse file: only its
    non-zero pages written)."""
    guest = boot_guest(kvm, MARKER)
    assert guest.memory.size == FILE_RAM
    with path.open("wb") as out:
        out.truncate(FILE_RAM)
        guest.memory.save_to(out.fileno(), 0)
    guest.vm.close()


def _run_marker(kvm: Kvm, path: Path, value: int, *, copy: bool) -> Vm:
    vm = kvm.create_vm()
    memory = vm.add_memory(0, FILE_RAM, backing=path, copy=copy)
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vcpu = vm.create_vcpu(0)
    # The tables are in the file already; this loads the registers (and rewrites the
    # tables with the same bytes).
    setup_long_mode(vm, vcpu, memory, entry=CODE_AT, stack=STACK_TOP)
    vcpu.set_regs({"rax": value})
    assert vcpu.run().reason == "device_exit"
    return vm


def _mark(vm: Vm) -> int:
    value: int = struct.unpack("<Q", vm.read(MARK_AT, 8))[0]
    return value


def test_save_to_writes_only_non_zero_pages(kvm: Kvm, tmp_path: Path) -> None:
    vm = kvm.create_vm()
    memory = vm.add_memory(0x10_0000, FILE_RAM)
    vm.write(0x10_0000 + 5 * PAGE + 100, b"five")
    vm.write(0x10_0000 + 6 * PAGE, b"\x01")
    vm.write(0x10_0000 + FILE_RAM - 1, b"\xff")
    path = tmp_path / "memory.bin"
    header = 2 * PAGE
    with path.open("wb") as out:
        out.truncate(header + FILE_RAM)
        written = memory.save_to(out.fileno(), header)
    assert written == 3 * PAGE
    data = path.read_bytes()
    assert data[:header] == bytes(header)
    assert data[header:] == vm.read(0x10_0000, FILE_RAM)
    # The file system allocated the written pages only (SEEK_DATA finds them).
    allocated = os.stat(path).st_blocks * 512
    assert allocated <= 8 * PAGE, f"{allocated} bytes allocated for 3 pages"
    with path.open("rb") as again:
        assert os.lseek(again.fileno(), 0, os.SEEK_DATA) == header + 5 * PAGE
    with pytest.raises(OSError) as bad:
        memory.save_to(-1, 0)
    assert bad.value.errno == errno.EBADF


def test_two_vms_on_one_memory_file_do_not_see_each_others_writes(kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "memory.bin"
    _saved_guest(kvm, path)
    before = path.read_bytes()
    first = _run_marker(kvm, path, 0x1111, copy=False)
    second = _run_marker(kvm, path, 0x2222, copy=False)
    assert (_mark(first), _mark(second)) == (0x1111, 0x2222)
    first.write(MARK_AT + 8, b"host")
    assert second.read(MARK_AT + 8, 4) == bytes(4)
    assert path.read_bytes() == before


def test_copy_mode_reads_the_file_into_anonymous_memory(kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "memory.bin"
    _saved_guest(kvm, path)
    before = path.read_bytes()
    vm = kvm.create_vm()
    vm.add_memory(0, FILE_RAM, backing=path, copy=True)
    assert vm.read(0, FILE_RAM) == before
    vm.close()
    assert _mark(_run_marker(kvm, path, 0x3333, copy=True)) == 0x3333
    assert path.read_bytes() == before


def test_backing_offset_selects_the_slots_bytes(kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "memory.bin"
    path.write_bytes(b"H" * PAGE + b"slot" + bytes(2 * PAGE - 4))
    for copy in (False, True):
        vm = kvm.create_vm()
        vm.add_memory(0x1000, 2 * PAGE, backing=str(path), backing_offset=PAGE, copy=copy)
        assert vm.read(0x1000, 5) == b"slot\0"


def test_a_bad_memory_file_is_refused_and_nothing_is_mapped(kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(3 * PAGE))
    vm = kvm.create_vm()
    for copy in (False, True):
        with pytest.raises(ValueError, match=r"short\.bin.*0x3000.*0x1000.*0x3000"):
            vm.add_memory(0, 3 * PAGE, backing=path, backing_offset=PAGE, copy=copy)
        with pytest.raises(ValueError, match=r"short\.bin.*offset 0x10 "):
            vm.add_memory(0, PAGE, backing=path, backing_offset=0x10, copy=copy)
        with pytest.raises(FileNotFoundError, match="missing") as missing:
            vm.add_memory(0, PAGE, backing=tmp_path / "missing.bin", copy=copy)
        assert missing.value.filename == str(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="need a backing file"):
        vm.add_memory(0, PAGE, copy=True)
    # Nothing was mapped: the range is still free.
    vm.add_memory(0, 3 * PAGE, backing=path)
    with pytest.raises(ValueError, match="overlaps"):
        vm.add_memory(0, PAGE, backing=path)


# ---- virtio queue state ------------------------------------------------------------------

QUEUE_SIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUFFERS = 0x8000
VERSION_1_EVENT_IDX = 1 << 32 | 1 << 29
QUEUE = (QUEUE_SIZE, DESC, AVAIL, USED, True)


def _offer_rng_buffer(vm: Vm, head: int, avail_idx: int) -> None:
    """Descriptor `head`: 32 writable bytes for virtio-rng, made available."""
    vm.write(DESC + 16 * head, struct.pack("<QIHH", BUFFERS + 0x100 * head, 32, 2, 0))
    vm.write(AVAIL + 4 + 2 * (avail_idx % QUEUE_SIZE), struct.pack("<H", head))
    vm.write(AVAIL + 2, struct.pack("<H", avail_idx + 1))


def _used_idx(vm: Vm) -> int:
    value: int = struct.unpack("<H", vm.read(USED + 2, 2))[0]
    return value


def _paused_rng(vm: Vm) -> VirtioDevice:
    """An rng device activated on the ring while paused: it serves nothing yet."""
    device = VirtioDevice.rng()
    device.pause()
    device.activate(vm, VERSION_1_EVENT_IDX, [QUEUE])
    return device


def test_queue_states_continue_a_ring_on_a_new_device(kvm: Kvm, tmp_path: Path) -> None:
    """Served on one VM, saved with its RAM, continued by a new device on a VM whose RAM
    is that memory file (mapped copy-on-write, as a restore maps it)."""
    vm = kvm.create_vm()
    memory = vm.add_memory(0, 0x10000)
    with EventLoop(coalesce_us=0) as loop:
        first = VirtioDevice.rng()
        assert first.queue_states() == [
            {
                "ready": False, "size": 0, "desc_table": 0, "avail_ring": 0, "used_ring": 0,
                "next_avail": 0, "next_used": 0, "event_idx": False, "signalled_used": None,
            }
        ]  # fmt: skip
        loop.add(first.queue_notifier(0), first.queue_handler(0))
        loop.start()
        first.activate(vm, VERSION_1_EVENT_IDX, [QUEUE])
        for n in range(3):
            _offer_rng_buffer(vm, n, n)
        first.queue_notifier(0).write(1)
        assert wait_until(lambda: _used_idx(vm) == 3)
        first.pause()
        states = first.queue_states()
        path = tmp_path / "memory.bin"
        with path.open("wb") as out:
            out.truncate(memory.size)
            memory.save_to(out.fileno(), 0)
        saved = path.read_bytes()
        first.close()
        loop.remove(first.queue_notifier(0))
        vm.close()
        assert states == [
            {
                "ready": True, "size": QUEUE_SIZE, "desc_table": DESC, "avail_ring": AVAIL,
                "used_ring": USED, "next_avail": 3, "next_used": 3, "event_idx": True,
                "signalled_used": 3,
            }
        ]  # fmt: skip

        vm = kvm.create_vm()
        vm.add_memory(0, 0x10000, backing=path)
        second = _paused_rng(vm)
        loop.add(second.queue_notifier(0), second.queue_handler(0))
        second.restore_queue_states(states)
        assert second.queue_states() == states
        second.resume()
        _offer_rng_buffer(vm, 5, 3)
        second.queue_notifier(0).write(1)
        assert wait_until(lambda: _used_idx(vm) == 4)
        # The new chain went to used entry 3; the three before were not served again.
        assert struct.unpack("<II", vm.read(USED + 4 + 8 * 3, 8)) == (5, 32)
        assert second.counters()["requests"] == 1
        second.close()
    assert path.read_bytes() == saved


def test_a_bad_queue_state_list_is_refused_and_changes_nothing(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.add_memory(0, 0x10000)
    device = _paused_rng(vm)
    before = device.queue_states()
    good = dict(before[0], next_avail=7, next_used=7, signalled_used=None)
    bad: list[tuple[object, str]] = [
        ([good, good], "2 queue states given"),
        ("not a list", "must be a list"),
        ([{k: v for k, v in good.items() if k != "next_used"}], 'no "next_used"'),
        ([dict(good, extra=1)], 'unknown key "extra"'),
        ([dict(good, ready=1)], '"ready" must be a bool'),
        ([dict(good, size=True)], '"size" must be an int'),
        ([dict(good, next_avail="7")], '"next_avail" must be an int'),
        ([dict(good, next_avail=1 << 16)], '"next_avail" must be an index'),
        ([dict(good, signalled_used=-1)], '"signalled_used" must be an int'),
        ([dict(good, size=8)], '"size" differs'),
        ([dict(good, used_ring=USED + 0x100)], '"used_ring" differs'),
        ([dict(good, ready=False)], '"ready" differs'),
    ]
    for states, message in bad:
        with pytest.raises(VirtioError, match=message):
            device.restore_queue_states(states)  # type: ignore[arg-type]
        assert device.queue_states() == before
    device.restore_queue_states([good])  # type: ignore[list-item]
    assert device.queue_states()[0]["next_avail"] == 7
    device.close()

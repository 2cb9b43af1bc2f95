"""The host check: its verdicts against what the SDM says a CPU does, its report and
cache, and its probe guests run on this host's KVM.

References: Intel SDM Vol. 3A 11.8.4 (a fixed interrupt stays in the ISR until
its EOI; TMR set for level), 6.8.3 (an interrupt pending at STI is taken after
the next instruction), Vol. 2B SYSCALL (CS = STAR[47:32], CPL 0).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

import kvm_vmm.hostcheck as hostcheck
from kvm_vmm.host_probes import (
    EXCEPTION_BASE,
    KERNEL_CS,
    KVM_ENOSYS_RESULT,
    LEVEL_VECTOR,
    NOT_TAKEN,
    PASSED,
    ProbeGuest,
    ProbeRun,
    build_probe_program,
    gdt64,
    page_tables,
)
from kvm_vmm.hostcheck import (
    BIT_COUNT_PROBES,
    CX16,
    HYPERCALL_FEATURES,
    INSTRUCTION_PROBES,
    KVM_PV_SEND_IPI,
    SMAP,
    Check,
    HostReport,
    bit_count_verdict,
    deferred_injection_verdict,
    early_eoi_verdict,
    host_report,
    hypercall_verdict,
    instruction_verdict,
    probe_host,
    syscall_verdict,
)
from kvmfast.testing import require_kvm

PROBES = {probe.key: probe for probe in INSTRUCTION_PROBES}
BIT_COUNTS = {probe.key: probe for probe in BIT_COUNT_PROBES}
LZCNT_BIT, BMI1_BIT = 1 << 5, 1 << 3  # CPUID 80000001H ECX[5], 07H EBX[3]


def done(value: int = PASSED, reports: list[int] | None = None) -> ProbeRun:
    return ProbeRun("done", value, reports or [])


# -- verdicts -------------------------------------------------------------------------------


def test_an_instruction_that_runs_passes() -> None:
    assert instruction_verdict(PROBES["clac"], done(), set()).verdict == "PASS"


def test_an_instruction_the_cpu_lacks_passes_since_guests_will_not_use_it() -> None:
    check = instruction_verdict(PROBES["clac"], done(EXCEPTION_BASE + 6), set())
    assert check.verdict == "PASS" and "#UD" in check.summary


def test_a_failing_instruction_with_a_linux_switch_warns_and_names_it() -> None:
    check = instruction_verdict(PROBES["pshufb"], ProbeRun("emulation-failure"), set())
    assert check.verdict == "WARN"
    assert check.linux_switches == ("clearcpuid=ssse3",)


def test_the_vmm_hides_a_cpuid_flag_it_can_clear_rather_than_ask_linux() -> None:
    check = instruction_verdict(PROBES["cmpxchg16b"], ProbeRun("emulation-failure"), {"cx16"})
    assert check.verdict == "WARN"
    assert check.cpuid_to_clear == ("cx16",) and check.linux_switches == ()


def test_a_failing_instruction_nothing_avoids_fails_only_if_linux_needs_it() -> None:
    int3 = instruction_verdict(PROBES["int3"], ProbeRun("emulation-failure"), set())
    iret32 = instruction_verdict(PROBES["iret32"], ProbeRun("emulation-failure"), set())
    assert int3.verdict == "FAIL"
    assert iret32.verdict == "WARN"  # 64-bit Linux never returns through a 32-bit IRET


def test_a_probe_that_hangs_is_inconclusive_not_a_failure() -> None:
    assert instruction_verdict(PROBES["clac"], ProbeRun("timeout"), set()).verdict == "WARN"


def test_lzcnt_and_tzcnt_pass_with_the_sdm_results() -> None:
    """SDM Vol. 2A LZCNT: LZCNT of 1 (64-bit) is 63; Vol. 2B TZCNT: TZCNT of 0 is 64."""
    assert bit_count_verdict(BIT_COUNTS["lzcnt"], done(reports=[LZCNT_BIT, 63])).verdict == "PASS"
    assert bit_count_verdict(BIT_COUNTS["tzcnt"], done(reports=[BMI1_BIT, 64])).verdict == "PASS"


def test_lzcnt_run_as_bsr_is_a_silent_wrong_result_that_linux_is_told_about() -> None:
    lzcnt = bit_count_verdict(BIT_COUNTS["lzcnt"], done(reports=[LZCNT_BIT, 0]))
    assert lzcnt.verdict == "WARN" and "silently wrong" in lzcnt.summary
    assert lzcnt.linux_switches == ("clearcpuid=abm",)
    tzcnt = bit_count_verdict(BIT_COUNTS["tzcnt"], done(reports=[BMI1_BIT, 0x5A5A]))
    assert tzcnt.verdict == "WARN" and tzcnt.linux_switches == ("clearcpuid=bmi1",)
    report = report_of(lzcnt, tzcnt)
    assert report.linux_switches() == ["clearcpuid=abm,bmi1"]
    assert report.failures == []  # Linux, told, does not use them: it is not stopped


def test_bsr_where_the_guest_cpuid_has_no_lzcnt_is_what_the_sdm_says() -> None:
    """SDM Vol. 2A LZCNT: without the feature the encoding executes as BSR."""
    check = bit_count_verdict(BIT_COUNTS["lzcnt"], done(reports=[~LZCNT_BIT & 0xFFFF, 0]))
    assert check.verdict == "PASS" and check.linux_switches == ()


def test_a_bit_count_probe_that_did_not_finish_is_inconclusive() -> None:
    assert bit_count_verdict(BIT_COUNTS["lzcnt"], ProbeRun("timeout")).verdict == "WARN"
    assert bit_count_verdict(BIT_COUNTS["lzcnt"], done(reports=[LZCNT_BIT])).verdict == "WARN"


def test_early_eoi_isr_bit_decides() -> None:
    """SDM 11.8.4: the vector stays in the ISR until the handler's EOI."""
    in_service = 1 << (LEVEL_VECTOR % 32)
    assert early_eoi_verdict(done(reports=[in_service, in_service])).verdict == "PASS"
    assert early_eoi_verdict(done(reports=[0, in_service])).verdict == "WARN"
    assert early_eoi_verdict(ProbeRun("timeout")).verdict == "WARN"


def test_deferred_injection_counts_instructions_after_sti() -> None:
    """SDM 6.8.3: a pending interrupt is taken once the instruction after STI completes."""
    assert deferred_injection_verdict(done(reports=[999])).verdict == "PASS"
    late = deferred_injection_verdict(done(reports=[489]))
    assert late.verdict == "WARN" and "~1022 instructions" in late.summary
    assert "next exit" in deferred_injection_verdict(done(reports=[NOT_TAKEN])).summary


def test_syscall_must_enter_at_cpl0() -> None:
    """SDM Vol. 2B SYSCALL: CS.Selector = STAR[47:32] & 0xFFFC, CPL 0."""
    assert syscall_verdict(done(reports=[KERNEL_CS])).verdict == "PASS"
    assert syscall_verdict(done(EXCEPTION_BASE + 14, [0x1B, 0x1016B])).verdict == "FAIL"
    assert syscall_verdict(ProbeRun("triple-fault")).verdict == "WARN"


# -- the report --------------------------------------------------------------------------------


def report_of(*checks: Check) -> HostReport:
    return HostReport({"release": "test"}, list(checks), 0.01)


def test_a_hypercall_must_return_kvms_answer() -> None:
    """hypercalls.rst: an unknown hypercall returns -KVM_ENOSYS in RAX."""
    seen = done(reports=[0])
    answered = hypercall_verdict("VMCALL", done(reports=[KVM_ENOSYS_RESULT]), seen, ())
    assert answered.verdict == "PASS" and not answered.cpuid_to_clear
    wrong = hypercall_verdict("VMCALL", done(reports=[0]), seen, HYPERCALL_FEATURES)
    assert wrong.verdict == "WARN" and "probe ended" in wrong.summary


def test_a_hypercall_that_never_completes_hides_the_features_linux_uses_it_for() -> None:
    hung = ProbeRun("timeout")
    offered = (KVM_PV_SEND_IPI,)
    hidden = hypercall_verdict("VMMCALL", hung, done(reports=[0x1_0000]), offered)
    assert hidden.verdict == "WARN"
    assert hidden.cpuid_to_clear == ("KVM_FEATURE_PV_SEND_IPI",)
    # The guest still sees the bit: hiding does not reach it, so SMP Linux hangs.
    still_seen = hypercall_verdict("VMMCALL", hung, done(reports=[1 << 11]), offered)
    assert still_seen.verdict == "FAIL" and not still_seen.cpuid_to_clear
    nothing_offered = hypercall_verdict("VMMCALL", hung, done(reports=[0]), ())
    assert nothing_offered.verdict == "WARN" and not nothing_offered.cpuid_to_clear


def test_the_hidden_hypercall_features_are_cleared_from_kvms_leaf() -> None:
    report = HostReport(
        {}, [Check("hypercall", "t", "WARN", "s", cpuid_to_clear=("KVM_FEATURE_PV_SEND_IPI",))], 0
    )
    assert report.cpuid_bits_to_clear() == [KVM_PV_SEND_IPI]
    entries = [(0x4000_0001, 0, 0, 0x1007EFB, 0, 0, 0), (1, 0, 0, 0x800, 0, 0, 0)]
    cleared = KVM_PV_SEND_IPI.cleared_in(entries)
    assert cleared == [(0x4000_0001, 0, 0, 0x10076FB, 0, 0, 0), (1, 0, 0, 0x800, 0, 0, 0)]


def test_linux_switches_are_merged_into_one_clearcpuid() -> None:
    report = report_of(
        Check("a", "A", "WARN", "", linux_switches=("clearcpuid=smap",)),
        Check("b", "B", "WARN", "", linux_switches=("noxsave",)),
        Check("c", "C", "WARN", "", linux_switches=("clearcpuid=ssse3",)),
        Check("d", "D", "WARN", "", linux_switches=("clearcpuid=smap", "noxsave")),
        Check("e", "E", "WARN", "", cpuid_to_clear=("cx16",)),
    )
    assert report.linux_switches() == ["noxsave", "clearcpuid=smap,ssse3"]
    assert report.cpuid_bits_to_clear() == [CX16]


def test_report_survives_its_json() -> None:
    report = report_of(
        Check("kvm", "KVM", "PASS", "ok"),
        Check("x", "X", "FAIL", "bad", linux_switches=("noxsave",), cpuid_to_clear=("smap",)),
    )
    again = HostReport.from_json(report.to_json())
    assert again.checks == report.checks and again.identity == report.identity
    assert again.from_cache
    assert [c.key for c in again.failures] == ["x"]


def test_one_line_per_check_verdict_first() -> None:
    lines = report_of(Check("kvm", "KVM", "PASS", "usable"), Check("x", "X", "WARN", "so")).lines()
    assert [line.split()[0] for line in lines] == ["PASS", "WARN"]


def test_cpuid_bit_cleared_only_where_it_lives() -> None:
    entries = [(1, 0, 0, 0, 0, 0xFFFF_FFFF, 0), (7, 0, 1, 0, 0xFFFF_FFFF, 0, 0)]
    cleared = SMAP.cleared_in(CX16.cleared_in(entries))
    assert not CX16.test(cleared) and not SMAP.test(cleared)
    assert cleared[0][5] == 0xFFFF_FFFF & ~(1 << 13)
    assert cleared[1][4] == 0xFFFF_FFFF & ~(1 << 20)


@pytest.fixture
def counted_probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_probe_host(kvm: object = None) -> list[Check]:
        calls.append(1)
        return [Check("kvm", "KVM", "PASS", "usable"), Check("x", "X", "WARN", "quirk")]

    monkeypatch.setattr(hostcheck, "probe_host", fake_probe_host)
    return calls


def test_cached_per_host_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_probes: list[int]
) -> None:
    first = host_report(tmp_path)
    second = host_report(tmp_path)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.checks == first.checks and len(counted_probes) == 1

    identity = hostcheck.host_identity()
    monkeypatch.setattr(hostcheck, "host_identity", lambda: {**identity, "release": "7.0-new"})
    assert not host_report(tmp_path).from_cache  # a new host kernel probes again
    assert len(counted_probes) == 2
    assert host_report(tmp_path, refresh=True).from_cache is False
    assert len(counted_probes) == 3


def test_the_cache_keeps_the_newest_reports_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_probes: list[int]
) -> None:
    identity = hostcheck.host_identity()
    other = tmp_path / "not-a-report.json"
    other.write_text("{}")
    for build in range(hostcheck.CACHE_KEEP + 3):
        monkeypatch.setattr(
            hostcheck, "host_identity", lambda b=build: {**identity, "kvmfast": str(b)}
        )
        host_report(tmp_path)
        newest = hostcheck.cache_file(tmp_path, hostcheck.host_identity())
        os.utime(newest, ns=(build * 10**9, build * 10**9))  # mtime order = build order
    kept = sorted(tmp_path.glob(f"{hostcheck.CACHE_PREFIX}*.json"))
    assert len(kept) == hostcheck.CACHE_KEEP and other.exists()
    assert newest in kept  # the report just written stays
    assert len(counted_probes) == hostcheck.CACHE_KEEP + 3


def test_a_damaged_cache_file_is_probed_over(tmp_path: Path, counted_probes: list[int]) -> None:
    path = hostcheck.cache_file(tmp_path, hostcheck.host_identity())
    path.write_text("{not json")
    assert not host_report(tmp_path).from_cache
    assert json.loads(path.read_text())["checks"][0]["key"] == "kvm"


def test_a_report_whose_probes_did_not_run_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        hostcheck,
        "probe_host",
        lambda kvm=None: [
            Check("kvm", "KVM", "PASS", "usable"),
            Check("probes", "probe guests", "WARN", "not built: no as"),
        ],
    )
    host_report(tmp_path)
    assert not list(tmp_path.glob("hostcheck-*.json"))


def test_identity_names_the_host_kernel_and_kvm_build() -> None:
    identity = hostcheck.host_identity()
    assert identity["release"] and identity["kvmfast"]
    assert "probe_version" in identity


# -- the probe guest's environment -----------------------------------------------------------


def test_only_the_user_page_is_user_accessible() -> None:
    """SDM Vol. 3A 4.6: user access needs U/S = 1 at every paging level."""
    tables = page_tables(0x4000, (0x12000, 0x13000))
    user = 0x4
    pml4, pdpt0 = (
        struct.unpack_from("<Q", tables, 0)[0],
        struct.unpack_from("<Q", tables, 0x1000)[0],
    )
    assert pml4 & user and pdpt0 & user
    small = struct.unpack_from("<512Q", tables, 0x6000)
    assert [i for i, entry in enumerate(small) if entry & user] == [0x12]
    assert all(entry & 0xFFFFF000 == i << 12 for i, entry in enumerate(small))
    huge = struct.unpack_from("<512Q", tables, 0x3000)  # the second GiB: 2 MiB pages
    assert huge[0] == (1 << 30) | 0x83


def test_the_tss_descriptor_points_at_the_tss() -> None:
    """SDM Vol. 3A 8.2.3: a 16-byte available 64-bit TSS descriptor, type 9."""
    low, high = struct.unpack_from("<2Q", gdt64(0x2000), 5 * 8)
    base = (low >> 16 & 0xFFFFFF) | (low >> 56 & 0xFF) << 24 | high << 32
    assert base == 0x2000 and low & 0xFFFF == 0x67
    assert low >> 40 & 0xFF == 0x89  # present, type 9


# -- on this host's KVM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_checks() -> list[Check]:
    require_kvm()
    return probe_host()


@pytest.mark.kvm
def test_probes_all_run_and_agree_with_each_other(host_checks: list[Check]) -> None:
    by_key = {check.key: check for check in host_checks}
    assert len(by_key) == len(host_checks)
    assert by_key["kvm"].verdict == "PASS"
    for key in ("kernel-code", "user-code", "cpuid", "early-eoi", "deferred-injection"):
        assert "probe ended" not in by_key[key].summary, by_key[key]
    assert "probe ended" not in by_key["user-syscall"].summary
    if by_key["kernel-code"].verdict == "PASS":
        # Kernel code that runs natively runs every instruction the CPU has.
        assert all(c.verdict == "PASS" for c in host_checks if c.key.startswith("insn-"))
    for check in host_checks:
        if check.key.startswith("insn-"):
            assert "probe ended" not in check.summary, check


@pytest.mark.kvm
def test_bit_count_probes_report_the_guests_cpuid_and_result(guest: ProbeGuest) -> None:
    """What the guest gets is either the SDM's result or the BSR/BSF one (0 for LZCNT of
    1, the untouched 0x5A5A for TZCNT of 0); the verdict follows it."""
    for probe, sdm, bsr_bsf in ((BIT_COUNTS["lzcnt"], 63, 0), (BIT_COUNTS["tzcnt"], 64, 0x5A5A)):
        run = guest.run(probe.entry)
        assert run.passed and len(run.reports) == 2, run
        has_feature = bool(run.reports[0] >> probe.cpuid.bit & 1)
        assert run.reports[1] in (sdm, bsr_bsf), run
        wrong = has_feature and run.reports[1] != sdm
        check = bit_count_verdict(probe, run)
        assert (check.linux_switches == (f"clearcpuid={probe.cpuid.name}",)) == wrong
        assert check.verdict == ("WARN" if wrong else "PASS")


@pytest.mark.kvm
def test_the_report_is_read_back_from_the_cache(tmp_path: Path) -> None:
    require_kvm()
    first = host_report(tmp_path)
    second = host_report(tmp_path)
    assert not first.from_cache and second.from_cache
    assert second.checks == first.checks


@pytest.fixture(scope="module")
def guest() -> ProbeGuest:
    require_kvm()
    import kvmfast
    from kvm_vmm.cpuid import cpuid_for_vcpu

    kvm = kvmfast.Kvm()
    return ProbeGuest(kvm, build_probe_program(), cpuid_for_vcpu(kvm.supported_cpuid(), 0, 1))


@pytest.mark.kvm
def test_level_interrupt_probe_sees_tmr_set(guest: ProbeGuest) -> None:
    """SDM 11.8.4: TMR is set for a level-triggered interrupt, whatever the ISR does."""
    run = guest.run(
        "early_eoi",
        handlers={LEVEL_VECTOR: "level_handler"},
        on_signal=hostcheck.raise_level_interrupt,
    )
    assert run.passed, run
    assert run.reports[1] >> (LEVEL_VECTOR % 32) & 1
    assert ("eoi", LEVEL_VECTOR) in run.events  # the EOI comes back as KVM_EXIT_IOAPIC_EOI


@pytest.mark.kvm
def test_an_unhandled_exception_is_reported_with_its_vector(guest: ProbeGuest) -> None:
    """Without a gate of its own, INT3 lands in the generic stub of vector 3."""
    run = guest.run("insn_int3")
    assert run.exception == 3 or run.ending == "emulation-failure", run


@pytest.mark.kvm
def test_a_hanging_probe_is_stopped_by_the_watchdog(guest: ProbeGuest) -> None:
    """The level probe waits in HLT for an interrupt that never comes without its signal."""
    short = ProbeGuest(guest.kvm, guest.program, guest.cpuid, timeout=0.2)
    run = short.run("early_eoi", handlers={LEVEL_VECTOR: "level_handler"})
    assert run.ending == "timeout"


@pytest.mark.kvm
def test_the_hypercall_probe_agrees_with_a_guest_that_reads_its_answer(
    host_checks: list[Check], guest: ProbeGuest
) -> None:
    """Whatever the host does, the check says it: a hypercall answered (PASS) or one
    that never returns, with KVM's PV features hidden where hiding reaches the guest."""
    check = next(check for check in host_checks if check.key == "hypercall")
    vendor_amd = "VMMCALL" in check.title
    entry = "hypercall_vmmcall" if vendor_amd else "hypercall_vmcall"
    run = ProbeGuest(guest.kvm, guest.program, guest.cpuid, timeout=0.5).run(entry)
    if run.passed:
        assert run.reports == [KVM_ENOSYS_RESULT]
        assert check.verdict == "PASS"
    else:
        assert run.ending == "timeout", run
        assert check.verdict in ("WARN", "FAIL") and "never completes" in check.summary
        if check.cpuid_to_clear:
            hidden = guest.cpuid
            for bit in HYPERCALL_FEATURES:
                hidden = bit.cleared_in(hidden)
            seen = guest.run("pv_features", cpuid=hidden)
            assert seen.passed and not any(
                seen.reports[0] >> bit.bit & 1 for bit in HYPERCALL_FEATURES
            )


@pytest.mark.kvm
def test_cpl3_code_cannot_touch_supervisor_pages(guest: ProbeGuest) -> None:
    """The SYSCALL probe relies on it: LSTAR's page is supervisor-only, as in Linux."""
    from kvm_vmm.host_probes import MSR_LSTAR, MSR_STAR

    run = guest.run(
        "user_syscall",
        mode="user",
        handlers={14: "page_fault_handler"},
        msrs={MSR_LSTAR: guest.program.symbols["syscall_entry"], MSR_STAR: KERNEL_CS << 32},
    )
    assert run.passed or run.exception == 14, run
    if run.exception == 14:
        assert run.reports[0] & 3 == 3  # the fault came from CPL 3, at LSTAR
        assert run.reports[1] == guest.program.symbols["syscall_entry"] & 0xFFFF_FFFF

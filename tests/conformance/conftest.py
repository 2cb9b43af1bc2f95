"""The conformance suite needs /dev/kvm: skip with the reason where it is absent,
fail instead where KVM_SPLIT_REQUIRE_KVM=1 (CI on a machine that has it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvm_devices.ioapic import Ioapic
from kvmfast.testing import require_kvm


@pytest.fixture(autouse=True)
def _needs_kvm() -> Iterator[None]:
    require_kvm()
    yield


@pytest.fixture
def eoi_vectors(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every vector that reaches our IOAPIC's EOI, through the VMM's own wiring.

    The Machine hands ``platform.ioapic.eoi`` to each vCPU when it is built, so
    the spy wraps the method on the class before any GuestMachine exists and
    calls the real one: the tests see what the VMM delivers, and without the
    VMM's wiring they see nothing and the guest's Remote IRR stays set.
    """
    vectors: list[int] = []
    real_eoi: Callable[[Ioapic, int], None] = Ioapic.eoi

    def spying_eoi(ioapic: Ioapic, vector: int) -> None:
        vectors.append(vector)
        real_eoi(ioapic, vector)

    monkeypatch.setattr(Ioapic, "eoi", spying_eoi)
    return vectors

"""Snapshots: a paused machine written to a directory, and read back into a new one.

:meth:`kvm_vmm.Machine.snapshot` and :meth:`kvm_vmm.Machine.restore` use these parts:
the state file (:mod:`.state_file`), the memory file (:mod:`.memory_file`), each vCPU's
state (:mod:`.vcpu_state`), the host facts a guest depends on (:mod:`.host_facts`) and
disk images' identity (:mod:`.disks`). docs/snapshots.md describes the format.
"""

from kvm_vmm.snapshot.errors import SNAPSHOT_ERROR_STATUS, SnapshotError
from kvm_vmm.snapshot.state_file import SCHEMA, SCHEMA_VERSION, STATE_FILE

__all__ = ["SCHEMA", "SCHEMA_VERSION", "SNAPSHOT_ERROR_STATUS", "STATE_FILE", "SnapshotError"]

"""The Linux KVM userspace ABI (x86-64) as pure data, under the kernel's own names.

``kvm_abi.KVM_RUN``, ``kvm_abi.KVM_CAP_SPLIT_IRQCHIP``, ``kvm_abi.kvm_run``, ... come
from ``constants``, ``ioctls`` and ``structs``; ``_IO``/``_IOR``/``_IOW``/``_IOWR`` from
the ioctl encoding; ``KVM_INTERRUPT_ERRORS`` from ``errors``. ``kvm_abi.ioctl`` is the
small helper that issues them.
"""

from kvm_abi import constants as constants
from kvm_abi import errors as errors
from kvm_abi import ioctl as ioctl
from kvm_abi import ioctls as ioctls
from kvm_abi import structs as structs
from kvm_abi._ioc import _IO as _IO
from kvm_abi._ioc import _IOC as _IOC
from kvm_abi._ioc import _IOC_DIR as _IOC_DIR
from kvm_abi._ioc import _IOC_NONE as _IOC_NONE
from kvm_abi._ioc import _IOC_NR as _IOC_NR
from kvm_abi._ioc import _IOC_READ as _IOC_READ
from kvm_abi._ioc import _IOC_SIZE as _IOC_SIZE
from kvm_abi._ioc import _IOC_TYPE as _IOC_TYPE
from kvm_abi._ioc import _IOC_WRITE as _IOC_WRITE
from kvm_abi._ioc import _IOR as _IOR
from kvm_abi._ioc import _IOW as _IOW
from kvm_abi._ioc import _IOWR as _IOWR
from kvm_abi.constants import *  # noqa: F403
from kvm_abi.errors import *  # noqa: F403
from kvm_abi.ioctls import *  # noqa: F403
from kvm_abi.structs import *  # noqa: F403

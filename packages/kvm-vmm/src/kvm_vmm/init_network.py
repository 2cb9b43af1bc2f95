"""The demo /init's network lines: loopback up, eth0 configured from the kernel
command line's ``ip=``, and a word on virtio-vsock.

Debian's cloud kernel is built without CONFIG_IP_PNP, so it ignores ``ip=``: the
script reads /proc/cmdline itself and takes the kernel's syntax
(Documentation/admin-guide/nfs/nfsroot.rst, "ip="):
``ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>``.
The client address may also carry a ``/prefix``; a netmask left out is the client
address's class mask, as the kernel derives it. Only static configuration is done
(autoconf ``off``, ``none`` or empty): the demo ships no DHCP client script, so
``dhcp`` and the other protocols are reported as not supported. Whatever the
command line holds, the script prints one line and goes on: nothing here is
evaluated, and no error stops /init.
"""

from __future__ import annotations

import re

PROC_CMDLINE = "/proc/cmdline"
SYS_CLASS_NET = "/sys/class/net"  # one directory per network interface
VSOCK_DEVICE = "/dev/vsock"  # there once the vsock transport is loaded
DEFAULT_DEVICE = "eth0"  # the first virtio-net device
IP_SYNTAX = "ip=CLIENT-IP:SERVER-IP:GW-IP:NETMASK:HOSTNAME:DEVICE:off"
IP_EXAMPLE = "ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")


def _checked_path(path: str) -> str:
    # The paths go into a shell script unquoted in places (loops over globs).
    if not _SAFE_PATH.match(path):
        raise ValueError(f"path {path!r}: expected letters, digits and '_./-'")
    return path


def network_setup(cmdline: str = PROC_CMDLINE, net_class: str = SYS_CLASS_NET) -> str:
    """Shell lines (POSIX sh: busybox ash in the guest) that bring ``lo`` up and, when
    the guest has a network interface, configure it from the last ``ip=`` word of
    ``cmdline`` with busybox ``ip``, then print one line saying what it got."""
    cmdline, net_class = _checked_path(cmdline), _checked_path(net_class)
    return f"""ip link set lo up
net_say() {{ printf '%s\\n' "$*"; }}  # echo would take backslashes in ip= as escapes
net_quad() {{  # a dotted quad, each part 0-255
    case $1 in ''|*[!0-9.]*|*..*|.*|*.) return 1 ;; esac
    net_ifs=$IFS; IFS=.; set -- $1; IFS=$net_ifs
    [ $# -eq 4 ] || return 1
    for net_part; do
        [ ${{#net_part}} -le 3 ] && [ "$net_part" -le 255 ] || return 1
    done
}}
net_mask_bits() {{  # a netmask's prefix length; fails for a mask that is not contiguous
    net_bits=0; net_rest=0; net_ifs=$IFS; IFS=.; set -- $1; IFS=$net_ifs
    for net_part; do
        case $net_rest$net_part in
            0255) net_bits=$((net_bits + 8)) ;;
            0254) net_bits=$((net_bits + 7)); net_rest=1 ;;
            0252) net_bits=$((net_bits + 6)); net_rest=1 ;;
            0248) net_bits=$((net_bits + 5)); net_rest=1 ;;
            0240) net_bits=$((net_bits + 4)); net_rest=1 ;;
            0224) net_bits=$((net_bits + 3)); net_rest=1 ;;
            0192) net_bits=$((net_bits + 2)); net_rest=1 ;;
            0128) net_bits=$((net_bits + 1)); net_rest=1 ;;
            00|10) net_rest=1 ;;
            *) return 1 ;;
        esac
    done
    echo $net_bits
}}
net_configure() {{  # $1: the value of ip=; prints why it cannot, and fails
    case $1 in
        off|none) net_addr=; return 0 ;;
        on|any|dhcp|bootp|rarp|both) set -- "::::::$1" ;;
    esac
    net_ifs=$IFS; IFS=:; set -- $1; IFS=$net_ifs
    net_client=$1 net_gw=$3 net_mask=$4 net_host=$5 net_dev=${{6:-{DEFAULT_DEVICE}}} net_auto=$7
    case $net_auto in
        ''|off|none) ;;
        *) net_say "ip=: autoconf '$net_auto' is not supported (no DHCP client here): \\
give a static address, {IP_EXAMPLE}"; return 1 ;;
    esac
    if [ ! -d {net_class}/"$net_dev" ]; then
        net_say "ip=: no network device '$net_dev' (the guest has:" $(ls {net_class})")"
        return 1
    fi
    net_prefix=
    case $net_client in */*) net_prefix=${{net_client#*/}}; net_client=${{net_client%%/*}} ;; esac
    if ! net_quad "$net_client"; then
        net_say "ip=: '$net_client' is not a client address; expected {IP_SYNTAX}"
        return 1
    fi
    if [ -n "$net_prefix" ]; then
        case $net_prefix in ''|*[!0-9]*) net_prefix=99 ;; esac
        if [ ${{#net_prefix}} -gt 2 ] || [ "$net_prefix" -gt 32 ]; then
            net_say "ip=: '/${{1#*/}}' is not a prefix length (0-32)"
            return 1
        fi
    elif [ -n "$net_mask" ]; then
        if ! net_quad "$net_mask" || ! net_prefix=$(net_mask_bits "$net_mask"); then
            net_say "ip=: '$net_mask' is not a netmask (such as 255.255.255.0)"
            return 1
        fi
    else
        net_first=${{net_client%%.*}}
        if [ "$net_first" -lt 128 ]; then net_prefix=8
        elif [ "$net_first" -lt 192 ]; then net_prefix=16
        else net_prefix=24; fi
    fi
    if [ -n "$net_gw" ] && ! net_quad "$net_gw"; then
        net_say "ip=: '$net_gw' is not a gateway address"
        return 1
    fi
    net_addr=$net_client/$net_prefix
    ip addr add "$net_addr" dev "$net_dev" || return 1
    ip link set "$net_dev" up || return 1
    if [ -n "$net_gw" ]; then
        ip route add default via "$net_gw" dev "$net_dev" || return 1
    fi
    if [ -n "$net_host" ]; then
        hostname "$net_host"
    fi
}}
net_arg=
net_given=
net_dev={DEFAULT_DEVICE}
net_gw=
net_addr=
set -f  # a word such as ip=* is taken as it is
for net_word in $(cat {cmdline}); do
    case $net_word in ip=*) net_arg=${{net_word#ip=}}; net_given=1 ;; esac
done
if [ -n "$net_given" ]; then
    net_configure "$net_arg" || net_addr=failed
fi
set +f
[ -d {net_class}/"$net_dev" ] || net_dev={DEFAULT_DEVICE}
if [ -d {net_class}/"$net_dev" ]; then
    net_mac=$(cat {net_class}/"$net_dev"/address)
    if [ "$net_addr" = failed ]; then
        ip link set "$net_dev" up
        net_say "$net_dev ($net_mac) is up without an address: ip=$net_arg was not used"
    elif [ -n "$net_addr" ]; then
        net_say "$net_dev ($net_mac) is $net_addr${{net_gw:+, gateway $net_gw}} (ip= on the \\
kernel command line)"
    else
        ip link set "$net_dev" up
        net_say "$net_dev ($net_mac) is up without an address: kvm-vmm demo --cmdline \\
'{IP_EXAMPLE}' gives one, or 'ip addr add' here"
    fi
fi
"""


def vsock_note(device: str = VSOCK_DEVICE) -> str:
    """A shell line saying that the guest has virtio-vsock. The guest's CID is in the
    device's configuration space, which Linux shows neither in sysfs nor in /proc:
    the line names the option that set it instead."""
    device = _checked_path(device)
    return f"""if [ -c {device} ]; then
    echo "vsock: {device} is here; this guest's CID is kvm-vmm's --vsock cid=, \\
and the host reaches a guest port P by writing 'CONNECT P' to the --vsock socket="
fi
"""

#!/bin/sh
# Run a command (Xen's xl) in a private mount namespace that gives libxl its compiled-in
# paths without touching the host: /etc, /var, /run and /usr/lib become overlays whose
# upper layers are under STATE, so whatever libxl writes (/var/lib/xen/userdata-*,
# /var/log/xen, /var/run/xen ...) lands there.  /usr/lib/xen-4.17 links to the peers
# tree's Xen programs (xl console execs /usr/lib/xen-4.17/bin/xenconsole); an empty
# /etc/xen/xl.conf and hotplug scripts that do nothing (xenpv's backends need none) are
# provided unless STATE already has them.  Needs root (unshare -m) and overlayfs.
#
#   shim/xl-namespace.sh STATE PEERS COMMAND [ARG...]
#   e.g. shim/xl-namespace.sh /tmp/xl-state ~/.cache/xenpv/peers \
#            ~/.cache/xenpv/peers/usr/lib/xen-4.17/bin/xl list
set -e
if [ "$XENPV_XL_NAMESPACE" != 1 ]; then
    export XENPV_XL_NAMESPACE=1
    exec unshare -m --propagation private "$0" "$@"
fi
state=$1
peers=$2
shift 2
for dir in etc var run usr/lib; do
    layer=$state/$(echo "$dir" | tr / _)
    mkdir -p "$layer/up" "$layer/work"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$layer/up,workdir=$layer/work" "/$dir"
done
mkdir -p /etc/xen/scripts /var/lib/xen /var/log/xen /run/xen
[ -e /etc/xen/xl.conf ] || echo "# xl on the xenpv loopback emulator" > /etc/xen/xl.conf
for script in block vif-bridge; do
    if [ ! -e "/etc/xen/scripts/$script" ]; then
        printf '#!/bin/sh\nexit 0\n' > "/etc/xen/scripts/$script"
        chmod 755 "/etc/xen/scripts/$script"
    fi
done
[ -e /usr/lib/xen-4.17 ] || ln -s "$peers/usr/lib/xen-4.17" /usr/lib/xen-4.17
unset XENPV_XL_NAMESPACE
exec "$@"

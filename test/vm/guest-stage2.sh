# nbd-attach test VM, stage 2. Sourced by the initramfs /init (busybox sh, PID 1) from the
# control share; test/vm/run.sh copies it there next to `config` and `cmd.sh`.
# PID 1 stays in the initramfs (busybox ash reaps every child it is sent, so orphaned daemons
# do not linger as zombies); the command runs chrooted into the host root mounted over 9p.
# Never returns: ends with poweroff -f.

. /ctl/config   # NBDVM_CWD NBDVM_GUEST_TIMEOUT NBDVM_KVER

R=/newroot
V=/run/nbd-vm            # inside the guest root: control share, kernel tree, helper scripts
P9='trans=virtio,version=9p2000.L,msize=262144'

CTL=/ctl                 # where the control share is mounted right now (moved below)
finish() { # $1 = exit status to report
  echo "$1" > "$CTL/status.tmp" && mv "$CTL/status.tmp" "$CTL/status"
  echo "nbd-vm: exit status $1"
  sync
  poweroff -f
  sleep 5
}
must() { "$@" || { echo "nbd-vm: stage 2 setup failed: $*"; finish 125; }; }

# The host root, read-only. cache=loose: without it every exec re-reads binaries over 9p.
must mount -t 9p -o "$P9,ro,cache=loose" nbdvm_root "$R"
must mount -t proc proc "$R/proc"
must mount -t sysfs sys "$R/sys"
must mount -t debugfs debugfs "$R/sys/kernel/debug"
must mount -t devtmpfs dev "$R/dev"
mkdir -p "$R/dev/pts" "$R/dev/shm"
ln -sf /proc/self/fd "$R/dev/fd"
ln -sf /proc/self/fd/0 "$R/dev/stdin"
ln -sf /proc/self/fd/1 "$R/dev/stdout"
ln -sf /proc/self/fd/2 "$R/dev/stderr"
must mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
must mount -t tmpfs -o mode=1777 shm "$R/dev/shm"
must mount -t tmpfs -o mode=1777 tmp "$R/tmp"
must mount -t tmpfs -o mode=755 run "$R/run"
must mount -t tmpfs -o mode=1777 vartmp "$R/var/tmp"
mkdir -p "$R$V/ctl" "$R$V/kroot" "$R$V/bin" "$R/run/lock" "$R/run/netns"
must mount -o move /ctl "$R$V/ctl"
CTL="$R$V/ctl"
# The unpacked kernel package (modules + modules.dep from depmod -b), read-only.
must mount -t 9p -o "$P9,ro,cache=loose" nbdvm_kroot "$R$V/kroot"
# The checkout, at the same absolute path as on the host, read-only. Shared on its own so that
# a checkout under /tmp or /run (hidden by the tmpfs mounts above) works too.
mkdir -p "$R$NBDVM_CWD" 2>/dev/null
must mount -t 9p -o "$P9,ro,cache=loose" nbdvm_work "$R$NBDVM_CWD"

# Module loading. The unpacked tree is not /lib/modules, so:
#  - vm-modprobe (and a `modprobe` shadow first on PATH) = modprobe -d <kernel tree>;
#  - the kernel's own request_module helper (used by mount -t ext4, ip link add type veth,
#    tc qdisc ... netem, ss -K) goes through kernel-modprobe, which refuses nbd: only a test
#    loads nbd, so "module not loaded" stays testable.
cat > "$R$V/bin/vm-modprobe" <<EOF
#!/bin/sh
exec /usr/sbin/modprobe -d $V/kroot "\$@"
EOF
cp "$R$V/bin/vm-modprobe" "$R$V/bin/modprobe"
chmod 755 "$R$V/bin/vm-modprobe" "$R$V/bin/modprobe"
# The same helper path exists in the initramfs (where the kernel runs it: it chroots) and in the
# guest root (where tests can inspect or run it: it calls modprobe directly).
HELPER=$V/bin/kernel-modprobe
write_helper() { # $1 = file, $2 = command prefix
  cat > "$1" <<EOF
#!/bin/sh
# kernel.modprobe of the nbd-attach test VM: modprobe -d $V/kroot, but never auto-loads nbd.
for a in "\$@"; do
  case "\$a" in nbd|block-major-43*) echo "kernel-modprobe: refusing to auto-load \$a" >&2; exit 1 ;; esac
done
exec $2/usr/sbin/modprobe -d $V/kroot "\$@"
EOF
  chmod 755 "$1"
}
mkdir -p "$V/bin"
write_helper "$HELPER" "/bin/chroot $R "
write_helper "$R$HELPER" ""
echo "$HELPER" > /proc/sys/kernel/modprobe

ip link set lo up || echo "nbd-vm: warning: cannot bring lo up"
hostname nbd-vm
stty -onlcr 2>/dev/null   # the host log gets \n, not \r\n

read -r up _ < /proc/uptime
echo "nbd-vm: kernel $(uname -r) up ${up}s, running the command in $NBDVM_CWD"

# The command, with a watchdog that shows what hung, kills everything and powers off, before the
# host gives up on the VM (NBDVM_GUEST_TIMEOUT is a bit shorter than run.sh --timeout).
klines=$(dmesg | wc -l)    # on failure, show only the kernel messages logged after this point
env -i /bin/chroot "$R" /bin/bash --noprofile --norc "$V/ctl/cmd.sh" &
cmd_pid=$!
(
  sleep "$NBDVM_GUEST_TIMEOUT"
  : > /timed-out
  echo "nbd-vm: GUEST TIMEOUT: the command ran longer than ${NBDVM_GUEST_TIMEOUT}s; processes:"
  ps -o pid,ppid,stat,time,args 2>/dev/null || ps
  echo "nbd-vm: kernel messages since the command started (last 40):"
  dmesg | tail -n +$((klines + 1)) | tail -n 40
  kill -TERM -1
  sleep 3
  kill -KILL -1
  sleep 10
  echo "nbd-vm: the command is still not gone (stuck in the kernel?)"
  finish 124
) &
wd_pid=$!
wait "$cmd_pid"
status=$?
kill "$wd_pid" 2>/dev/null
if [ -e /timed-out ]; then
  status=124
elif [ "$status" -ne 0 ]; then
  echo "nbd-vm: the command failed (exit $status); kernel messages since it started (last 60):"
  dmesg | tail -n +$((klines + 1)) | tail -n 60
fi
finish "$status"

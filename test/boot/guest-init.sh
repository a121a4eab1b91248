#!/bin/sh
# /sbin/init of the boot tests' root image (test/boot/lib.ts buildRootImage): proves the root came
# up over NBD, reports on the serial console with `BT:` lines the host reads, and powers off.
# The kernel command line chooses what it does: bt.marker=TEXT (written to /marker), bt.writer=SECONDS
# (write and verify files for that long while the host restarts the server), bt.lib=DIR and
# bt.node=FILE (the running system uses nbd-attach: DIR is /usr/lib/nbd-attach as the package lays
# it out and FILE a node binary, both on the host, whose root the VM shares read-only over 9p).
export PATH=/bin:/sbin
[ -r /proc/uptime ] || mount -t proc proc /proc
[ -d /sys/block ] || mount -t sysfs sys /sys
[ -c /dev/null ] || mount -t devtmpfs dev /dev
say() { echo "BT: $*" > /dev/console; }
say "init-running uptime=$(cut -d' ' -f1 /proc/uptime)"

arg() { for x in $(cat /proc/cmdline); do case "$x" in "$1"=*) echo "${x#*=}";; esac; done; }
marker="$(arg bt.marker)"
writer="$(arg bt.writer)"

say "root $(awk '$2 == "/" { print "dev=" $1 " type=" $3 " opts=" $4 }' /proc/mounts)"
mount -o remount,rw / 2>/dev/null

say "data-sha256=$(sha256sum /data | cut -d' ' -f1)"
if [ -n "$marker" ]; then
  echo "$marker" > /marker && sync && say "marker-written=$marker"
fi

# The running system's view of the root device, as an administrator has it after an upgrade:
# `nbd-attach status`; `--reattach` refused while the supervisor runs; the supervisor stopped
# (SIGTERM: a busy device stays attached); `--reattach` adopts the root; `status` again. The writer
# below then runs through a server restart with the adopted supervisor.
lib="$(arg bt.lib)"
if [ -n "$lib" ]; then
  mkdir -p /host /usr
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose host /host && mount --bind /host/usr /usr; then
    na() { "/host$(arg bt.node)" "/host$lib/nbd-attach.mjs" "$@"; }
    sup_pid() { for p in /proc/[0-9]*; do case "$(tr '\0' '\n' < "$p/cmdline" 2>/dev/null | head -n1)" in @*) echo "${p#/proc/}";; esac; done; }
    old="$(sup_pid)"
    say "status-before $(na status 2>&1 | grep '^/dev/nbd0:' | tr ' ' '_') supervisor-before=$old"
    na --reattach /dev/nbd0 > /tmp/reattach.out 2>&1; rc=$?
    say "reattach-supervised-rc=$rc $(head -n1 /tmp/reattach.out | tr ' ' '_')"
    kill -TERM "$old"
    i=0; while [ -d "/proc/$old" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
    [ -d "/proc/$old" ] && say "supervisor-did-not-exit"
    echo "after the supervisor stopped" > /after-stop && sync && say "root-written-unsupervised=$(cat /after-stop | wc -c)"
    na --reattach /dev/nbd0 > /tmp/reattach.out 2>&1; rc=$?
    say "reattach-rc=$rc $(head -n1 /tmp/reattach.out | tr ' ' '_')"
    new="$(sup_pid)"
    say "status-after $(na status 2>&1 | grep '^/dev/nbd0:' | tr ' ' '_') supervisor-after=$new argv0-after=$(tr '\0' '\n' < "/proc/$new/cmdline" | head -n1 | tr ' ' '_')"
  else
    say "host-mount-failed"
  fi
fi

if [ -n "$writer" ]; then
  if [ -n "$(arg bt.debug)" ]; then sleep 2; ps -o pid,comm,args | grep -v '\[' > /dev/console; cat /run/nbd-attach/nbd0.log > /dev/console; fi
  say "writer-start seconds=$writer"
  start=$(cut -d. -f1 /proc/uptime)
  i=0; bad=0; failed=0
  while [ $(( $(cut -d. -f1 /proc/uptime) - start )) -lt "$writer" ]; do
    f=/w.$((i % 4))
    if ! { yes "round $i of the writer" | head -c 1048576 > "$f" && sync; }; then failed=$((failed + 1)); fi
    echo 3 > /proc/sys/vm/drop_caches
    want="$(yes "round $i of the writer" | head -c 1048576 | sha256sum | cut -d' ' -f1)"
    got="$(sha256sum < "$f" | cut -d' ' -f1)"
    [ "$want" = "$got" ] || bad=$((bad + 1))
    i=$((i + 1))
  done
  say "writer-done rounds=$i mismatches=$bad failed=$failed"
fi

# (Late: the supervisor follows the root within half a second of switch_root.)
sleep 1
# The supervisor carrying the root: argv[0] marked '@', still alive after switch_root.
for p in /proc/[0-9]*; do
  a0="$(tr '\0' '\n' < "$p/cmdline" 2>/dev/null | head -n1)"
  case "$a0" in
  @*) say "supervisor pid=${p#/proc/} comm=$(tr ' ' '_' < "$p/comm") argv0=$(echo "$a0" | tr ' ' '_') oom=$(cat "$p/oom_score_adj")" ;;
  esac
done
# Its state and log moved with /run (what `nbd-attach status` reads in the running system).
for f in /run/nbd-attach/*; do
  [ -e "$f" ] && say "run-file $(basename "$f") bytes=$(wc -c < "$f")"
done
if [ -n "$(arg bt.debug)" ]; then ps -o pid,comm,args > /dev/console; cat /run/nbd-attach/nbd0.log > /dev/console; fi
if [ -e /run/nbd-attach/nbd0.json ]; then
  say "state $(tr -d ' \n' < /run/nbd-attach/nbd0.json | sed 's/.*"pid":\([0-9]*\).*"reconnects":\([0-9]*\).*/state-pid=\1 reconnects=\2/')"
  say "state-server $(tr -d ' \n' < /run/nbd-attach/nbd0.json | sed 's/.*"server":"\([^"]*\)".*/\1/')"
fi
grep -q 'switch_root: now in the real root' /run/nbd-attach/nbd0.log 2>/dev/null && say "followed-root=1"
# What `nbd-attach boot` said when the root was ready (its attach line: size, TLS path…).
[ -r /run/nbd-attach/boot.env ] && say "boot-ready $(sed -n 's/^NBDROOT_MESSAGE=//p' /run/nbd-attach/boot.env | tr ' ' '_')"
# An nbds:// root: the kernel's TLS sockets (software crypto counters) and the path the state names.
[ -r /proc/net/tls_stat ] && say "tls $(awk '{ printf "%s=%s ", $1, $2 }' /proc/net/tls_stat)"
[ -e /run/nbd-attach/nbd0.json ] && say "state-tls-path=$(tr -d ' \n' < /run/nbd-attach/nbd0.json | sed -n 's/.*"tlsPath":"\([a-z]*\)".*/\1/p')"

say "io-errors=$(dmesg | grep -c -i 'I/O error')"
say "nbd-dmesg $(dmesg | grep -i nbd | tail -n 3 | tr '\n' '|' | tr ' ' '_')"
sync
mount -o remount,ro / || say "remount-ro-failed"
say "done"
poweroff -f

#!/bin/sh
# PID 1 of the user-mode Linux guest (see ../shared/docs/testing.md section 2).
# Environment from the kernel command line: RUNDIR (host directory, also visible here through
# hostfs), GUEST_TIMEOUT (seconds).  Runs "$RUNDIR/cmd.sh", records its exit status in
# $RUNDIR/rc (via rc.tmp + mv) and powers off.  Nothing may leak into the host's /run or /var/log.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HERE=$(dirname "$0")
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev  # the kernel may have done it
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=512m tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/log
export TMPDIR=/dev/shm
# UML 6.1 runs here without xstate support (see uml_boot.py): keep glibc and OpenSSL off
# AVX/AVX-512 code, whose upper register state the guest would not preserve.
export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX2,-AVX,-FMA,-BMI2,-ERMS,-FSRM,-RTM"
export OPENSSL_ia32cap="~0x0800000000000000:~0xD0230020"
export GODEBUG=cpu.all=off  # Go programs (docker-registry) likewise
KV=$(uname -r)
M=/usr/lib/uml/modules/$KV/kernel
for mod in "drivers/block/nbd.ko nbds_max=4" "fs/erofs/erofs.ko" "fs/fuse/fuse.ko" "drivers/block/loop.ko max_loop=4"; do
  set -- $mod
  python3 "$HERE/guest_helper.py" insmod "$M/$1" $2 >>"$RUNDIR/init.log" 2>&1
done
ip link set lo up 2>/dev/null
timeout -k 5 "${GUEST_TIMEOUT:-300}" sh "$RUNDIR/cmd.sh" >"$RUNDIR/guest.log" 2>&1
echo $? >"$RUNDIR/rc.tmp"
mv "$RUNDIR/rc.tmp" "$RUNDIR/rc"
sync
python3 "$HERE/guest_helper.py" poweroff
echo o >/proc/sysrq-trigger

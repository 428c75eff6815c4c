#!/bin/sh
# PID 1 of the user-mode Linux guest (see ../shared/docs/testing.md section 2 and uml.py).
# Environment from the kernel command line: RUNDIR (host directory, also visible here through
# hostfs), GUEST_TIMEOUT (seconds), UML_BOOT (plain|fxsave: how uml.py booted this kernel).
# Runs "$RUNDIR/cmd.sh", records its exit status in $RUNDIR/rc (via rc.tmp + mv) and powers off.
# Nothing may leak into the host's /run or /var/log.  Module loading and power-off use perl
# (Debian's perl-base is essential) rather than kmod or Python, so the guest reports and powers off
# even where the workload's Python cannot start.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev  # the kernel may have done it
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=512m tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/log
export TMPDIR=/dev/shm
if [ "$UML_BOOT" = fxsave ]; then
  # UML runs without xstate support on this path (uml_boot.py): keep glibc, OpenSSL and Go
  # programs (docker-registry) off AVX/AVX-512 code, whose upper register state is not switched.
  export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX2,-AVX,-FMA,-BMI2,-ERMS,-FSRM,-RTM"
  export OPENSSL_ia32cap="~0x0800000000000000:~0xD0230020"
  export GODEBUG=cpu.all=off
fi
KV=$(uname -r)
M=/usr/lib/uml/modules/$KV/kernel
# finit_module(2) is syscall 313 on x86_64 (UML uses the host architecture's table); EEXIST is fine
for mod in "drivers/block/nbd.ko nbds_max=4" "fs/erofs/erofs.ko" "fs/fuse/fuse.ko" "drivers/block/loop.ko max_loop=4" \
           "fs/overlayfs/overlay.ko" "drivers/md/dm-mod.ko" "drivers/md/dm-bufio.ko" "drivers/md/dm-verity.ko"; do
  set -- $mod
  perl -e 'open(my $f, "<", $ARGV[0]) or die "insmod $ARGV[0]: $!\n";
           syscall(313, fileno($f), $ARGV[1] // "", 0) == 0 or $!{EEXIST} or die "insmod $ARGV[0]: $!\n"' \
    "$M/$1" "$2" >>"$RUNDIR/init.log" 2>&1
done
ip link set lo up 2>/dev/null
timeout -k 5 "${GUEST_TIMEOUT:-300}" sh "$RUNDIR/cmd.sh" >"$RUNDIR/guest.log" 2>&1
echo $? >"$RUNDIR/rc.tmp"
mv "$RUNDIR/rc.tmp" "$RUNDIR/rc"
sync
# reboot(2), syscall 169: LINUX_REBOOT_MAGIC1/2, LINUX_REBOOT_CMD_POWER_OFF
perl -e 'syscall(169, 0xfee1dead, 672274793, 0x4321fedc, 0); die "reboot: $!\n"'
echo o >/proc/sysrq-trigger

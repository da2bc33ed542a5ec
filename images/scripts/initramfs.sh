#!/usr/bin/env bash
# Step: the guest initramfs: busybox (static), sysbench with every shared library it loads, and
# images/initramfs/init, written as an UNCOMPRESSED newc cpio (a guest kernel running under
# instruction emulation takes minutes to gunzip; copying is cheap). A second archive,
# initramfs-bench.cpio, adds stress-ng and its libraries for `spanvm bench sysbench`: they double
# the archive, and on kvm_pvm the kernel's unpacking takes about 4 s per MB (about 165 s instead
# of 77 s per boot), which every other Linux boot should not pay.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
require_packages busybox-static sysbench stress-ng libc6

init="$IMAGES_DIR/initramfs/init"
output="$OUT/initramfs.cpio"
bench_output="$OUT/initramfs-bench.cpio"
key="$(stamp_key "$0" "$IMAGES_DIR/scripts/lib.sh" "$init" \
    "busybox-static $(pkg_version busybox-static)" "sysbench $(pkg_version sysbench)" \
    "stress-ng $(pkg_version stress-ng)" "libc6 $(pkg_version libc6)" \
    "$(ldd /usr/bin/sysbench /usr/bin/stress-ng | sed 's/ (0x[0-9a-f]*)$//' | sort)")"

if stamp_fresh initramfs "$key" "$output" "$bench_output"; then
    log "cached: $output $bench_output"
    exit 0
fi

root="$BUILD/initramfs-root"
rm -rf "$root"
# /mnt: where a guest mounts its data disk (mount -t ext4 /dev/vda /mnt).
mkdir -p "$root"/{dev,proc,sys,tmp,mnt,root,etc,bin,sbin,usr/bin,usr/sbin,usr/share}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"

log "busybox $(pkg_version busybox-static) and its applet links"
install -m 755 /bin/busybox "$root/bin/busybox"
"$root/bin/busybox" --list-full | while read -r applet; do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# Copies the executable $1 to the same path under $root with every library ldd resolves for it,
# plus the dynamic loader, at the path the loader looks for it.
install_with_libraries() {
    local program="$1" library libraries
    if ldd "$program" | grep -q 'not found'; then
        die "ldd cannot resolve every library of $program: $(ldd "$program" | grep 'not found')"
    fi
    install -D -m 755 "$program" "$root$program"
    libraries="$(ldd "$program" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)"
    for library in $libraries; do
        [ -e "$library" ] || die "$program needs $library, which is not on this machine"
        mkdir -p "$root$(dirname "$library")"
        cp -L "$library" "$root$library"
    done
}

log "sysbench $(pkg_version sysbench) and the shared libraries it links"
install_with_libraries /usr/bin/sysbench
cp -a /usr/share/sysbench "$root/usr/share/"
# libgcc_s is loaded with dlopen by glibc when a thread exits or is cancelled, so ldd may not
# list it; it goes in either way.
mkdir -p "$root/lib/x86_64-linux-gnu"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$root/lib/x86_64-linux-gnu/libgcc_s.so.1"

install -m 755 "$init" "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
# The kernel opens /dev/console for /init's stdin and stdout before anything is mounted.
mknod -m 600 "$root/dev/console" c 5 1

# write_cpio FILE: the staging root as FILE. Same inputs, same bytes: fixed times, owners and
# inode numbers, sorted names.
write_cpio() {
    log "writing $1 (newc, uncompressed)"
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) >"$1.partial"
    mv "$1.partial" "$1"
    log "initramfs: $1 ($(numfmt --to=iec --suffix=B "$(stat -c %s "$1")"))"
}
write_cpio "$output"

# stress-ng: the CPU methods of `spanvm bench sysbench` (GiantVM's section 5.3). It links about
# 16 MB of libraries sysbench does not (libIPSec_MB alone is 12 MB).
log "stress-ng $(pkg_version stress-ng) and the shared libraries it links"
install_with_libraries /usr/bin/stress-ng
write_cpio "$bench_output"
stamp_write initramfs "$key"

#!/bin/sh
# SPDX-License-Identifier: MIT
# mmdebstrap customize hook: turns the fresh Debian tree into a bootable lab
# guest, copies the kernel out for direct boot, and packs the tree into an
# ext4 image. Runs outside the chroot (inside mmdebstrap's namespace when it
# builds without root), so file ownership in the image is the guest's own.
#
#   customize.sh ROOTFS OUT_DIR HOSTKEY DISK_SIZE
set -eu
root=$1 out=$2 hostkey=$3 disk_size=$4

echo "uffdlab" > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 uffdlab\n' > "$root/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"

# QEMU user networking is always 10.0.2.0/24: a static address skips DHCP.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/10-lab.network" <<'NET'
[Match]
Name=eth0
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
NET
ln -sf /lib/systemd/system/systemd-networkd.service \
    "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"

# Only the lab's key logs in, and only the pinned host key is offered. The
# key is not baked in: it comes on the kernel command line
# (uffdlab.authkey=BASE64, an ed25519 public key), so one image serves any
# lab's key and can be exported to a colleague's lab.
mkdir -p "$root/root/.ssh"
chmod 0700 "$root/root/.ssh"
mkdir -p "$root/usr/local/sbin"
cat > "$root/usr/local/sbin/uffdlab-authkey" <<'AUTHKEY'
#!/bin/sh
# Install the lab's SSH key from the kernel command line (uffdlab.authkey=).
set -eu
key=
for word in $(cat /proc/cmdline); do
    case $word in uffdlab.authkey=*) key=${word#uffdlab.authkey=} ;; esac
done
case $key in
    "" | *[!A-Za-z0-9+/=]*) echo "uffdlab-authkey: no usable uffdlab.authkey=" >&2; exit 0 ;;
esac
umask 077
printf 'ssh-ed25519 %s uffdlab\n' "$key" > /root/.ssh/authorized_keys.new
mv /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys
AUTHKEY
chmod 0755 "$root/usr/local/sbin/uffdlab-authkey"
cat > "$root/etc/systemd/system/uffdlab-authkey.service" <<'UNIT'
[Unit]
Description=uffd-lab: the lab's SSH key from the kernel command line
Before=ssh.service ssh.socket
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/uffdlab-authkey

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants" \
         "$root/etc/systemd/system/ssh.service.wants"
for dir in multi-user.target.wants ssh.service.wants; do
    ln -sf /etc/systemd/system/uffdlab-authkey.service \
        "$root/etc/systemd/system/$dir/uffdlab-authkey.service"
done
rm -f "$root"/etc/ssh/ssh_host_*
cp "$hostkey" "$root/etc/ssh/ssh_host_ed25519_key"
cp "$hostkey.pub" "$root/etc/ssh/ssh_host_ed25519_key.pub"
chmod 0600 "$root/etc/ssh/ssh_host_ed25519_key"
cat > "$root/etc/ssh/sshd_config.d/uffdlab.conf" <<'SSHD'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
PermitRootLogin prohibit-password
MaxSessions 64
MaxStartups 64
UseDNS no
SSHD

# Timers that would compete with measurements in a short-lived guest.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
            fstrim.timer man-db.timer dpkg-db-backup.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# Kernel and initrd leave the image for QEMU's direct kernel boot.
release=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null \
    | sort -V | tail -n 1)
if [ -n "$release" ]; then
    cp "$root/boot/vmlinuz-$release" "$out/vmlinuz"
    cp "$root/boot/initrd.img-$release" "$out/initrd.img"
    echo "$release" > "$out/kernel-release"
fi
# Headers the guest tools will build against, recorded for provenance.
dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Version}' linux-libc-dev \
    > "$out/linux-libc-dev-version" 2>/dev/null || true
# Every installed package's exact version: what lab.lock records.
dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Package}\t${Version}\n' \
    | LC_ALL=C sort > "$out/manifest.tsv"

# /proc, /sys and /dev are still mounted here; mkfs.ext4 -d cannot skip
# them, so pack a copy that stays on the root file system.
stage="$out/rootfs.stage"
mkdir -p "$stage"
tar -C "$root" --one-file-system -cf - . | tar -C "$stage" -xpf -
mkdir -p "$stage/proc" "$stage/sys" "$stage/dev" "$stage/run" "$stage/tmp"
chmod 1777 "$stage/tmp"
mkfs.ext4 -q -F -L uffdlab-root -d "$stage" "$out/rootfs.raw" "$disk_size"
rm -rf "$stage"

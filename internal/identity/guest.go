package identity

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/qga"
)

// generalizeLinux clears what makes an installed Linux system one machine
// rather than another, the files virt-sysprep and `cloud-init clean`
// treat as identity: the next boot makes them anew. NIC names pinned to
// the old MACs (udev persistent-net, RHEL's HWADDR) would rename the
// clone's NICs, so they go too. An empty (not
// missing) machine-id is what systemd expects of an image. The random
// seed goes too: clones sharing it would start with the same entropy.
const generalizeLinux = `
command -v cloud-init >/dev/null 2>&1 && { cloud-init clean --logs --machine-id >/dev/null 2>&1 || cloud-init clean --logs >/dev/null 2>&1; }
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/lib/cloud/instance /var/lib/cloud/instances /var/lib/cloud/instance-id /var/lib/cloud/data
rm -f /var/lib/dhcp/*.leases /var/lib/dhclient/*.lease* /var/lib/NetworkManager/*.lease /var/lib/udhcpc/* 2>/dev/null
rm -f /var/lib/systemd/network/*.lease 2>/dev/null
rm -f /etc/udev/rules.d/70-persistent-net.rules
sed -i '/^HWADDR=/d' /etc/sysconfig/network-scripts/ifcfg-* 2>/dev/null
echo localhost >/etc/hostname
sync
test ! -s /etc/machine-id && ! ls /etc/ssh/ssh_host_* >/dev/null 2>&1
`

// Sysprep is the command that generalizes a Windows guest; it shuts the
// guest down itself when done. /mode:vm skips hardware re-detection,
// since the clone runs on the same virtual hardware.
var Sysprep = []string{`C:\Windows\System32\Sysprep\sysprep.exe`, "/generalize", "/oobe", "/shutdown", "/quiet", "/mode:vm"}

// Generalize clears the identity of the guest behind a, so that every
// machine made from its disk boots as a new one. It reports whether the
// guest is Windows: there sysprep runs in the background and powers the
// guest off itself, which takes minutes; a Linux guest is left running
// for the caller to shut down.
func Generalize(ctx context.Context, a qga.Agent) (windows bool, err error) {
	info, err := a.OSInfo(ctx)
	if err != nil {
		var qerr *qga.Error
		if !errors.As(err, &qerr) {
			return false, fmt.Errorf("generalize: ask the guest agent for the OS: %w", err)
		}
		// Agents without guest-get-osinfo predate Windows support for it.
	}
	if info.ID == "mswindows" {
		// start returns at once; sysprep outlives the agent's exec.
		args := append([]string{"/c", "start", `""`}, Sysprep...)
		res, err := a.Exec(ctx, qga.ExecRequest{Path: `C:\Windows\System32\cmd.exe`, Args: args})
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("exit code %d: %s", res.ExitCode, strings.TrimSpace(string(res.Stderr)))
		}
		if err != nil {
			return true, fmt.Errorf("generalize: start sysprep: %w", err)
		}
		return true, nil
	}
	res, err := a.Exec(ctx, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", generalizeLinux}})
	if err != nil {
		return false, fmt.Errorf("generalize: %w", err)
	}
	if res.ExitCode != 0 {
		return false, fmt.Errorf("generalize: the guest's script exited %d: %s", res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return false, nil
}

// SysprepTimeout bounds how long a Windows guest may take to generalize
// and power off.
const SysprepTimeout = 20 * time.Minute

// applyLinux gives a running Linux guest a new identity, for guests whose
// boot does not act on the seed (no cloud-init or equivalent): the host
// name ($1), a new machine-id and new SSH host keys.
const applyLinux = `
hn=$1
echo "$hn" >/etc/hostname
hostname "$hn" 2>/dev/null || hostnamectl set-hostname "$hn"
if grep -q '^127\.0\.1\.1' /etc/hosts 2>/dev/null; then
	sed -i "s/^127\.0\.1\.1.*/127.0.1.1	$hn/" /etc/hosts
else
	echo "127.0.1.1	$hn" >>/etc/hosts
fi
rm -f /etc/machine-id /var/lib/dbus/machine-id
if command -v systemd-machine-id-setup >/dev/null 2>&1; then
	systemd-machine-id-setup >/dev/null 2>&1
else
	tr -d '-' </proc/sys/kernel/random/uuid >/etc/machine-id
fi
mkdir -p /etc/ssh
rm -f /etc/ssh/ssh_host_*
if command -v ssh-keygen >/dev/null 2>&1; then
	ssh-keygen -A >/dev/null 2>&1
elif command -v dropbearkey >/dev/null 2>&1; then
	for t in ed25519 ecdsa; do
		k=/etc/ssh/ssh_host_${t}_key
		s=; [ $t = ecdsa ] && s="-s 256"
		dropbearkey -t $t $s -f $k.dropbear >/dev/null 2>&1 &&
			dropbearconvert dropbear openssh $k.dropbear $k >/dev/null 2>&1 &&
			dropbearkey -y -f $k.dropbear 2>/dev/null | grep -E '^(ssh|ecdsa)-' >$k.pub
		rm -f $k.dropbear
	done
fi
sync
test "$(hostname)" = "$hn" && test -s /etc/machine-id && ls /etc/ssh/ssh_host_*_key.pub >/dev/null 2>&1
`

// Apply gives the running Linux guest behind a a new identity through its
// agent: hostname, machine-id and SSH host keys. Lodge uses it when a
// clone boots but its guest ignores the seed. Windows guests get theirs
// from sysprep instead, so Apply refuses them.
func Apply(ctx context.Context, a qga.Agent, hostname string) error {
	if !ValidHostname(hostname) {
		return fmt.Errorf("apply identity: hostname %q is not a valid hostname", hostname)
	}
	if info, err := a.OSInfo(ctx); err == nil && info.ID == "mswindows" {
		return errors.New("apply identity: a Windows guest takes its identity from sysprep, not from the agent")
	}
	res, err := a.Exec(ctx, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", applyLinux, "sh", hostname}})
	if err != nil {
		return fmt.Errorf("apply identity: %w", err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("apply identity: the guest's script exited %d: %s", res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return nil
}

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
// treat as identity: the next boot makes them anew. An empty (not
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

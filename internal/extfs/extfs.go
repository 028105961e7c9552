// Package extfs reads files and directories out of an ext2/3/4 filesystem
// image without mounting it, through e2fsprogs' debugfs opened read-only.
// The image comes from a guest, so debugfs runs under CPU and memory
// limits, and paths are checked before they reach its command line.
package extfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/lodge-vm/lodge/internal/errdefs"
)

// File is one entry of a directory, or what Stat found.
type File struct {
	Name string `json:"name"`
	// Type is "file", "dir", "symlink" or "other".
	Type string `json:"type"`
	Mode uint32 `json:"mode"`
	Size int64  `json:"size"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
}

// Image is a filesystem image file.
type Image struct {
	Path string
	// Binary is debugfs; "debugfs" if empty.
	Binary string
}

// ErrNotExt says the image holds no ext filesystem debugfs can open.
var ErrNotExt = errors.New("not an ext2/3/4 filesystem")

// CheckPath refuses what is not an absolute, clean path that debugfs
// reads as one argument.
func CheckPath(p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("path %q: %w: must be absolute", p, errdefs.ErrInvalid)
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f || r == '"' || r == '\\' {
			return fmt.Errorf("path %q: %w: control characters, quotes and backslashes are not read", p, errdefs.ErrInvalid)
		}
	}
	if len(p) > 4096 {
		return fmt.Errorf("path %q: %w: longer than 4096 bytes", p[:64]+"...", errdefs.ErrInvalid)
	}
	return nil
}

// run runs one debugfs request, read-only, writing its output to out.
func (im Image) run(ctx context.Context, request string, out io.Writer) (string, error) {
	bin := im.Binary
	if bin == "" {
		bin = "debugfs"
	}
	argv := []string{bin, "-c", "-R", request, im.Path}
	if prlimit, err := exec.LookPath("prlimit"); err == nil {
		// A crafted filesystem must not keep debugfs busy or growing.
		argv = append([]string{prlimit, "--cpu=60", "--as=" + strconv.Itoa(1<<30), "--"}, argv...)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = out, &stderr
	err := cmd.Run()
	// debugfs says it found nothing on stderr and still exits 0; its
	// banner is always there and says nothing.
	var msgs []string
	for _, l := range strings.Split(stderr.String(), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "debugfs ") {
			msgs = append(msgs, l)
		}
	}
	msg := strings.Join(msgs, "; ")
	if err != nil {
		return msg, fmt.Errorf("debugfs: %s: %w", msg, err)
	}
	return msg, nil
}

// failure turns what debugfs said on stderr into an error.
func failure(path, msg string) error {
	switch {
	case msg == "":
		return nil
	case strings.Contains(msg, "File not found"):
		return fmt.Errorf("%s: %w in the guest's filesystem", path, errdefs.ErrNotFound)
	case strings.Contains(msg, "Bad magic number") || strings.Contains(msg, "superblock"):
		return fmt.Errorf("%w: %s", ErrNotExt, msg)
	}
	return fmt.Errorf("%s: %s", path, msg)
}

// Stat says what path is.
func (im Image) Stat(ctx context.Context, path string) (File, error) {
	if err := CheckPath(path); err != nil {
		return File{}, err
	}
	var out bytes.Buffer
	msg, err := im.run(ctx, `stat "`+path+`"`, &out)
	if err != nil {
		return File{}, err
	}
	if err := failure(path, msg); err != nil {
		return File{}, err
	}
	f, err := parseStat(out.String())
	if err != nil {
		return File{}, fmt.Errorf("%s: %w", path, err)
	}
	f.Name = path
	return f, nil
}

// parseStat reads debugfs's stat output: "Type: regular    Mode:  0644",
// "User:     0   Group:     0 ...   Size: 6".
func parseStat(s string) (File, error) {
	var f File
	fields := strings.Fields(s)
	seen := 0
	for i := 0; i+1 < len(fields); i++ {
		v := fields[i+1]
		switch fields[i] {
		case "Type:":
			f.Type = typeName(v)
			seen++
		case "Mode:":
			m, err := strconv.ParseUint(v, 8, 32)
			if err != nil {
				return f, fmt.Errorf("stat: mode %q", v)
			}
			f.Mode = uint32(m)
		case "User:":
			f.UID, _ = strconv.Atoi(v)
		case "Group:":
			f.GID, _ = strconv.Atoi(v)
		case "Size:":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				return f, fmt.Errorf("stat: size %q", v)
			}
			f.Size = n
			seen++
		}
	}
	if seen < 2 {
		return f, errors.New("stat: no type and size in debugfs's answer")
	}
	return f, nil
}

func typeName(debugfs string) string {
	switch debugfs {
	case "regular":
		return "file"
	case "directory":
		return "dir"
	case "symlink":
		return "symlink"
	}
	return "other"
}

// List lists a directory.
func (im Image) List(ctx context.Context, path string) ([]File, error) {
	if err := CheckPath(path); err != nil {
		return nil, err
	}
	var out bytes.Buffer
	msg, err := im.run(ctx, `ls -p "`+path+`"`, &out)
	if err != nil {
		return nil, err
	}
	if err := failure(path, msg); err != nil {
		return nil, err
	}
	return ParseList(out.String())
}

// ParseList reads debugfs's `ls -p` lines: /inode/mode/uid/gid/name/size/
// (a name cannot hold a slash, so the fields split cleanly). "." and ".."
// are left out.
func ParseList(s string) ([]File, error) {
	out := []File{}
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l == "" {
			continue
		}
		f := strings.Split(l, "/")
		if len(f) != 8 || f[0] != "" || f[7] != "" {
			return nil, fmt.Errorf("ls: unexpected line %q", l)
		}
		mode, err := strconv.ParseUint(f[2], 8, 32)
		if err != nil {
			return nil, fmt.Errorf("ls: mode in %q", l)
		}
		uid, err1 := strconv.Atoi(f[3])
		gid, err2 := strconv.Atoi(f[4])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("ls: owner in %q", l)
		}
		var size int64
		if f[6] != "" {
			if size, err = strconv.ParseInt(f[6], 10, 64); err != nil || size < 0 {
				return nil, fmt.Errorf("ls: size in %q", l)
			}
		}
		if f[5] == "." || f[5] == ".." || f[5] == "" {
			continue
		}
		out = append(out, File{Name: f[5], Type: modeType(uint32(mode)), Mode: uint32(mode) & 0o7777, UID: uid, GID: gid, Size: size})
	}
	return out, nil
}

func modeType(m uint32) string {
	switch m & 0o170000 {
	case 0o100000:
		return "file"
	case 0o040000:
		return "dir"
	case 0o120000:
		return "symlink"
	}
	return "other"
}

// Cat writes a regular file's content to w.
func (im Image) Cat(ctx context.Context, path string, w io.Writer) error {
	f, err := im.Stat(ctx, path)
	if err != nil {
		return err
	}
	if f.Type != "file" {
		return fmt.Errorf("%s: %w: it is a %s, not a regular file", path, errdefs.ErrInvalid, f.Type)
	}
	msg, err := im.run(ctx, `cat "`+path+`"`, w)
	if err != nil {
		return err
	}
	return failure(path, msg)
}

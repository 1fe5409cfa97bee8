package snat

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

// Tables reads and writes one family's tables. The exec implementation runs
// iptables-save and iptables-restore of one backend; FakeTables stands in for
// it in unit tests.
type Tables interface {
	// Save returns the iptables-save output of every table of the family.
	Save(f Family) (string, error)
	// Restore runs iptables-restore --noflush with payload: all of it, or
	// nothing if any line fails.
	Restore(f Family, payload string) error
	// CanDropNATTable reports whether DropNATTable works: with
	// iptables-nft and the nft command. Legacy tables cannot be unloaded
	// from a namespace.
	CanDropNATTable() bool
	// Generation changes whenever the family's nat table may have
	// changed; it costs no process (see ExecTables.Generation).
	Generation(f Family) (uint64, error)
	// SaveNAT is Save of the nat table alone.
	SaveNAT(f Family) (string, error)
	// DropTable deletes the family's table name (nat or mangle) if it
	// still holds nothing at all (checked right before deleting, so a rule
	// another tool added meanwhile is never lost), and does nothing
	// otherwise.
	DropTable(f Family, name string) error
}

// IPSets reads and writes ipsets.
type IPSets interface {
	// Save returns `ipset save` output.
	Save() (string, error)
	// Restore runs `ipset restore` with payload.
	Restore(payload string) error
	// Headers returns our sets' entry counts without their members.
	Headers() (map[string]int, error)
}

// ErrLockTimeout means another program held the xtables lock past the
// configured bound. Nothing was changed.
var ErrLockTimeout = errors.New("timed out waiting for the xtables lock")

// Backend names an iptables implementation.
type Backend string

const (
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// Other is the backend that is not b.
func (b Backend) Other() Backend {
	if b == BackendNFT {
		return BackendLegacy
	}
	return BackendNFT
}

// DetectBackend returns the backend the host's `iptables` command uses, the
// one operators and other tools on the host see. "auto" detects; "nft" and
// "legacy" are taken as given.
func DetectBackend(want string) (Backend, error) {
	switch want {
	case "nft":
		return BackendNFT, nil
	case "legacy":
		return BackendLegacy, nil
	case "", "auto":
	default:
		return "", Invalid("--iptables-backend %q: want auto, nft or legacy", want)
	}
	path, err := exec.LookPath("iptables")
	if err != nil {
		return "", fmt.Errorf("iptables not found in PATH (install the iptables package): %w", err)
	}
	// Debian, Ubuntu, Fedora and Alpine point iptables at
	// xtables-{nft,legacy}-multi; reading the link costs no process.
	if target, err := filepath.EvalSymlinks(path); err == nil {
		switch base := filepath.Base(target); {
		case strings.Contains(base, "nft"):
			return BackendNFT, nil
		case strings.Contains(base, "legacy"):
			return BackendLegacy, nil
		}
	}
	out, err := exec.Command(path, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version: %v: %s", path, err, bytes.TrimSpace(out))
	}
	if strings.Contains(string(out), "nf_tables") {
		return BackendNFT, nil
	}
	return BackendLegacy, nil
}

// ExecTables runs the save and restore commands of one backend.
type ExecTables struct {
	Backend Backend
	// Wait bounds the wait for the xtables lock; the tool never proceeds
	// without it.
	Wait time.Duration
	// bins are the save and restore commands per family.
	bins     map[Family]map[string]string
	checked  *sync.Once
	checkErr *error
}

// NewExecTables finds backend b's commands: iptables-nft-save,
// ip6tables-legacy-restore and so on, or the plain names where a
// distribution ships only the one backend under them. It checks, with
// go-iptables, that the iptables there is new enough to bound its wait for
// the xtables lock (1.6.2).
func NewExecTables(b Backend, wait time.Duration) (ExecTables, error) {
	t := ExecTables{Backend: b, Wait: wait, bins: map[Family]map[string]string{}}
	for _, f := range Families {
		base := map[Family]string{IPv4: "iptables", IPv6: "ip6tables"}[f]
		t.bins[f] = map[string]string{}
		for _, role := range []string{"", "save", "restore"} {
			split := base + "-" + string(b)
			plain := base
			if role != "" {
				split += "-" + role
				plain += "-" + role
			}
			p, err := exec.LookPath(split)
			if err != nil {
				// Only the plain names, which are the host's backend.
				if detected, derr := DetectBackend("auto"); derr != nil || detected != b {
					return t, fmt.Errorf("%s not found: install the iptables package with the %s backend", split, b)
				}
				if p, err = exec.LookPath(plain); err != nil {
					return t, fmt.Errorf("%s not found: install the iptables package", plain)
				}
			}
			t.bins[f][role] = p
		}
	}
	t.checked = new(sync.Once)
	t.checkErr = new(error)
	return t, nil
}

// checkVersion makes sure, once and only before the first write, that this
// iptables is new enough (1.6.2) for iptables-restore to bound its wait for
// the xtables lock. Reads do not need it, so a no-op run does not pay for
// the extra process.
func (t ExecTables) checkVersion() error {
	if t.checked == nil {
		return nil
	}
	t.checked.Do(func() {
		bin := t.bins[IPv4][""]
		ipt, err := iptables.New(iptables.Path(bin), iptables.Timeout(max(1, int(t.Wait/time.Second))))
		if err != nil {
			*t.checkErr = fmt.Errorf("%s: %w", bin, err)
			return
		}
		v1, v2, v3 := ipt.GetIptablesVersion()
		*t.checkErr = t.versionErr(bin, v1, v2, v3)
	})
	return *t.checkErr
}

func (t ExecTables) versionErr(bin string, v1, v2, v3 int) error {
	if v1 < 1 || v1 == 1 && (v2 < 6 || v2 == 6 && v3 < 2) {
		return fmt.Errorf("%s is version %d.%d.%d; egress-snat needs 1.6.2 or later, whose iptables-restore can wait for the xtables lock with a bound", bin, v1, v2, v3)
	}
	return nil
}

// versionFromSave does the version check with the header iptables-save
// printed ("# Generated by iptables-nft-save v1.8.9 (nf_tables) on ..."),
// which every write reads first: one process fewer per apply. With no
// tables there is no header, and checkVersion asks iptables itself.
func (t ExecTables) versionFromSave(text string) {
	if t.checked == nil {
		return
	}
	first, _, _ := strings.Cut(text, "\n")
	_, v, ok := strings.Cut(first, "-save v")
	if !ok || !strings.HasPrefix(first, "# Generated by ") {
		return
	}
	v, _, _ = strings.Cut(v, " ")
	var v1, v2, v3 int
	if n, _ := fmt.Sscanf(v, "%d.%d.%d", &v1, &v2, &v3); n != 3 {
		return
	}
	t.checked.Do(func() { *t.checkErr = t.versionErr(t.bins[IPv4][""], v1, v2, v3) })
}

// command returns the binary for family and role ("save" or "restore").
func (t ExecTables) command(f Family, role string) string {
	if p := t.bins[f][role]; p != "" {
		return p
	}
	// Not built by NewExecTables (ChainIn's probe): the split name.
	name := map[Family]string{IPv4: "iptables", IPv6: "ip6tables"}[f] + "-" + string(t.Backend) + "-" + role
	return name
}

func (t ExecTables) Save(f Family) (string, error) { return t.save(f) }

func (t ExecTables) save(f Family, args ...string) (string, error) {
	cmd := exec.Command(t.command(f, "save"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %v: %s", cmd.Path, err, strings.TrimSpace(stderr.String()))
	}
	out := stdout.String()
	t.versionFromSave(out)
	return out, nil
}

func (t ExecTables) Restore(f Family, payload string) error {
	if err := t.checkVersion(); err != nil {
		return err
	}
	secs := max(1, int(t.Wait.Round(time.Second)/time.Second))
	cmd := exec.Command(t.command(f, "restore"), "--noflush", "--wait", strconv.Itoa(secs))
	cmd.Stdin = strings.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "xtables lock") || strings.Contains(msg, "holding the lock") {
			return fmt.Errorf("%s: %w after %ds: %s", cmd.Path, ErrLockTimeout, secs, msg)
		}
		return fmt.Errorf("%s --noflush: %v: %s", cmd.Path, err, msg)
	}
	return nil
}

// ChainIn reports whether the managed chain exists in the nat table of
// backend b, which may not be the one in use: rules there still act on
// packets but the host's iptables does not show them. It reads with the
// backend's iptables-save, not `iptables -t nat -S` (go-iptables'
// ChainExists): with the legacy backend, naming a table loads it into the
// namespace, and a probe must not change the host.
func ChainIn(b Backend, f Family, wait time.Duration) (bool, error) {
	t := ExecTables{Backend: b, Wait: wait}
	name := map[Family]string{IPv4: "iptables", IPv6: "ip6tables"}[f] + "-" + string(b) + "-save"
	if _, err := exec.LookPath(name); err != nil {
		return false, nil // that backend is not installed, so it holds nothing of ours
	}
	text, err := t.Save(f)
	if err != nil {
		return false, err
	}
	in, err := ParseSave(f, text, nil)
	return in.ChainExists || len(in.Jumps) > 0, err
}

// ExecIPSets runs the ipset command.
type ExecIPSets struct{}

func (ExecIPSets) Save() (string, error) {
	if _, err := exec.LookPath("ipset"); err != nil {
		return "", nil // no ipset: no sets of ours can exist
	}
	cmd := exec.Command("ipset", "save")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("ipset save: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (ExecIPSets) Restore(payload string) error {
	if payload == "" {
		return nil
	}
	cmd := exec.Command("ipset", "restore")
	cmd.Stdin = strings.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ipset restore: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// CanDropNATTable is true for iptables-nft with the nft command installed.
func (t ExecTables) CanDropNATTable() bool {
	if t.Backend != BackendNFT {
		return false
	}
	_, err := exec.LookPath("nft")
	return err == nil
}

// DropNATTable deletes the family's nat table when it holds nothing at all,
// so that clear leaves iptables-save exactly as it was on a host where the
// tool created the table. The table is left when any chain other than the
// four empty built-ins, or any policy other than ACCEPT, is there.
func (t ExecTables) DropTable(f Family, name string) error {
	text, err := t.Save(f)
	if err != nil {
		return err
	}
	if !tableEmpty(text, name) {
		return nil
	}
	fam := nftFamily(f)
	if out, err := exec.Command("nft", "delete", "table", fam, name).CombinedOutput(); err != nil {
		return fmt.Errorf("nft delete table %s %s: %v: %s", fam, name, err, bytes.TrimSpace(out))
	}
	return nil
}

// tableEmpty reports whether the save text holds table name with only its
// built-in chains, empty, policy ACCEPT.
func tableEmpty(saveText, name string) bool {
	in := false
	seen := false
	for _, line := range strings.Split(saveText, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			in = line == "*"+name
			seen = seen || in
		case !in || line == "" || line == "COMMIT" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line)
			builtin := slices.Contains(builtinChains[name], strings.TrimPrefix(f[0], ":"))
			if !builtin || len(f) < 2 || f[1] != "ACCEPT" {
				return false
			}
		default:
			return false
		}
	}
	return seen
}

// HaveCapNetAdmin reports whether the process has CAP_NET_ADMIN in its
// effective set, read from /proc so it works in user namespaces too.
func HaveCapNetAdmin() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return os.Geteuid() == 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			v, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				return os.Geteuid() == 0
			}
			const capNetAdmin = 12
			return v&(1<<capNetAdmin) != 0
		}
	}
	return os.Geteuid() == 0
}

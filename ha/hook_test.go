package ha

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// hookRun is one run of the generated hook against stand-ins: a conntrackd
// that records its arguments (and fails the commands in fail), a
// systemctl that says egress-snat.service is not running, and a process
// standing in for `egress-snat watch` whose pid is in the pid file.
type hookRun struct {
	calls []string // conntrackd's arguments, one call a line
	log   string   // the hook's log
	hup   bool     // the stand-in for watch got SIGHUP
	state string   // the state file afterwards; "" if there is none
}

func runHook(t *testing.T, state string, fail []string, withPID bool) hookRun {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.Mkdir(bin, 0o755)
	calls := filepath.Join(dir, "calls")
	failCase := "''"
	if len(fail) > 0 {
		failCase = strings.Join(fail, " | ")
	}
	stub := "#!/bin/sh\necho \"$*\" >>" + calls + "\ncase $3 in " + failCase + ") exit 1 ;; esac\nexit 0\n"
	os.WriteFile(filepath.Join(bin, "conntrackd"), []byte(stub), 0o755)
	os.WriteFile(filepath.Join(bin, "systemctl"), []byte("#!/bin/sh\nexit 3\n"), 0o755)

	c := labA()
	c.Paths.Conntrackd = filepath.Join(bin, "conntrackd")
	c.Paths.ConntrackdConf = filepath.Join(dir, "conntrackd.conf")
	c.Paths.WatchPIDFile = filepath.Join(dir, "watch.pid")
	c.Paths.HookLog = filepath.Join(dir, "hook.log")
	c.Paths.Hook = filepath.Join(dir, "notify.sh")
	c.Paths.StateFile = filepath.Join(dir, "state")
	hook, err := Hook(c)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(c.Paths.Hook, []byte(hook), 0o755)

	// The stand-in for watch: SIGHUP ends it, as it would end any process
	// that does not handle it; watch does, and reconciles.
	watch := exec.Command("sleep", "30")
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- watch.Wait() }()
	t.Cleanup(func() { watch.Process.Kill(); <-waited })
	if withPID {
		os.WriteFile(c.Paths.WatchPIDFile, []byte(strconv.Itoa(watch.Process.Pid)+"\n"), 0o644)
	}

	cmd := exec.Command("sh", c.Paths.Hook, "GROUP", GroupName, state, "0")
	cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("hook %s: %v, want exit 0 and no output:\n%s", state, err, out)
	}
	var r hookRun
	if b, err := os.ReadFile(calls); err == nil {
		r.calls = strings.Split(strings.TrimSpace(string(b)), "\n")
	}
	b, _ := os.ReadFile(c.Paths.HookLog)
	r.log = string(b)
	b, _ = os.ReadFile(c.Paths.StateFile)
	r.state = string(b)
	select {
	case err := <-waited:
		r.hup = err != nil && strings.Contains(err.Error(), "hangup")
		waited <- err
	case <-time.After(500 * time.Millisecond):
	}
	return r
}

// TestHookSteps: the hook runs conntrackd's commands in primary-backup.sh's
// order for each state, then signals watch; a failing step is logged and
// the hook goes on; a state it does not know changes nothing.
func TestHookSteps(t *testing.T) {
	conf := func(args ...string) []string {
		var out []string
		for _, a := range args {
			out = append(out, "-C "+"CONF"+" "+a)
		}
		return out
	}
	for _, tc := range []struct {
		name, state string
		fail        []string
		pid         bool
		want        []string
		wantHUP     bool
		wantLog     []string
	}{
		{"master", "MASTER", nil, true, conf("-c", "-f", "-R", "-B"), true,
			[]string{"becoming MASTER", "conntrackd -c ok", "conntrackd -B ok", "SIGHUP sent to egress-snat watch"}},
		{"split brain healed and still master", "MASTER_RX_LOWER_PRI", nil, true, conf("-c", "-f", "-R", "-B"), true,
			[]string{"becoming MASTER_RX_LOWER_PRI", "conntrackd -c ok", "SIGHUP sent"}},
		{"backup", "BACKUP", nil, true, conf("-t", "-n"), true,
			[]string{"becoming BACKUP", "conntrackd -t ok", "conntrackd -n ok", "SIGHUP sent"}},
		{"fault is as backup", "FAULT", nil, true, conf("-t", "-n"), true,
			[]string{"becoming FAULT", "conntrackd -n ok"}},
		{"a failed commit goes on", "MASTER", []string{"-c"}, true, conf("-c", "-f", "-R", "-B"), true,
			[]string{"conntrackd -c failed (exit 1)", "conntrackd -f ok"}},
		{"no watch to tell", "MASTER", nil, false, conf("-c", "-f", "-R", "-B"), false,
			[]string{"no egress-snat to tell"}},
		{"unknown state", "STOP", nil, true, nil, false,
			[]string{"state 'STOP': nothing to do"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runHook(t, tc.state, tc.fail, tc.pid)
			var got []string
			for _, c := range r.calls {
				// The stub sees -C PATH ARG; the path is the test's.
				f := strings.Fields(c)
				if len(f) == 3 {
					f[1] = "CONF"
				}
				got = append(got, strings.Join(f, " "))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("conntrackd calls %q, want %q", got, tc.want)
			}
			if r.hup != tc.wantHUP {
				t.Errorf("watch got SIGHUP: %v, want %v\nhook log:\n%s", r.hup, tc.wantHUP, r.log)
			}
			for _, w := range tc.wantLog {
				if !strings.Contains(r.log, w) {
					t.Errorf("hook log lacks %q:\n%s", w, r.log)
				}
			}
			// The state file holds the state given, with the time, except
			// for MASTER_RX_LOWER_PRI, which is no transition.
			if tc.state == "MASTER_RX_LOWER_PRI" {
				if r.state != "" {
					t.Errorf("state file %q after %s, want none", r.state, tc.state)
				}
				return
			}
			st, err := ParseState(r.state)
			if err != nil || st.State != tc.state || time.Since(st.Since) > time.Minute || time.Since(st.Since) < 0 {
				t.Errorf("state file %q: parsed %+v, %v; want %s at about now", r.state, st, err, tc.state)
			}
		})
	}
}

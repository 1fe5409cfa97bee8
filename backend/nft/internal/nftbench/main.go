// Command nftbench measures package nft in the network namespace it runs
// in (run it with `ip netns exec`); scripts/nft-bench.sh drives it. It
// prints one line of key=value figures a run, times in milliseconds.
//
//	nftbench apply -f DSTFILE [-lib] [-drop]
//
// deletes our table, reads the destinations (one prefix a line, as
// `benchconn gen` writes them) into host entries via eth0 from -natural to
// -to, and writes them as a fresh table in one transaction: Render, Plan,
// Run. With -lib it writes the same table through google/nftables' own
// Conn (AddSet, SetAddElements, Flush; the sets without the rules) instead,
// to compare memory.
// With -drop the entries are dropped before the write, as a caller that
// no longer needs them would.
//
//	nftbench change -f DSTFILE -rounds R
//
// writes the table, then moves the file's first destination to -other and
// back, R times each, in process: there by Patch+Run (a daemon that keeps
// its table and knows what changed), back by Plan+Run and Render+Plan+Run
// (one that knows only the entries).
//
//	nftbench oneshot -dst PREFIX -from ADDR -to ADDR
//
// moves one destination between the sets of two addresses as a one-shot
// command would: read the table without elements (ReadShape), delete the
// element from one set and add it to the other, at the generation read.
//
//	nftbench script -f DSTFILE
//
// prints the fresh table's program as nft(8) input (Program.Show): the
// raw `nft -f` floor of the same table.
//
//	nftbench read
//
// times ReadShape and the full Read.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/snat"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: nftbench apply|change|oneshot|read [flags] (see the package comment)")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "apply":
		err = apply(os.Args[2:])
	case "change":
		err = change(os.Args[2:])
	case "oneshot":
		err = oneshot(os.Args[2:])
	case "read":
		err = read()
	case "script":
		err = script(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nftbench:", err)
		os.Exit(1)
	}
}

type entryFlags struct {
	file, natural, to, other, out *string
}

func addEntryFlags(fs *flag.FlagSet) entryFlags {
	return entryFlags{
		file:    fs.String("f", "", "destination file, one prefix a line"),
		natural: fs.String("natural", "192.0.2.250", "natural source"),
		to:      fs.String("to", "192.0.2.22", "SNAT address"),
		other:   fs.String("other", "192.0.2.23", "the address change moves a destination to"),
		out:     fs.String("out", "eth0", "output interface"),
	}
}

// entries reads the destination file into host entries sharing one To
// slice, as snat.Resolve makes them.
func (f entryFlags) entries() ([]snat.Entry, error) {
	natural, err := netip.ParseAddr(*f.natural)
	if err != nil {
		return nil, err
	}
	to, err := netip.ParseAddr(*f.to)
	if err != nil {
		return nil, err
	}
	ps, err := readPrefixes(*f.file)
	if err != nil {
		return nil, err
	}
	tos := []netip.Addr{to}
	es := make([]snat.Entry, len(ps))
	for i, p := range ps {
		es[i] = snat.Entry{Match: snat.Match{Dst: p, Out: *f.out}, Natural: natural, To: tos}
	}
	snat.SortEntries(es) // in order already: only checked
	return es, nil
}

// renderStream renders the sorted prefixes as host entries through one
// Entry variable.
func renderStream(f entryFlags, ps []netip.Prefix) (*nft.Table, error) {
	natural, err := netip.ParseAddr(*f.natural)
	if err != nil {
		return nil, err
	}
	to, err := netip.ParseAddr(*f.to)
	if err != nil {
		return nil, err
	}
	e := snat.Entry{Match: snat.Match{Out: *f.out}, Natural: natural, To: []netip.Addr{to}}
	return nft.RenderSeq(func(yield func(*snat.Entry) bool) {
		for _, p := range ps {
			e.Dst = p
			if !yield(&e) {
				return
			}
		}
	})
}

// readPrefixes reads a destination file and sorts it as the chain orders
// entries (longest prefix first, then by address), as 32-byte prefixes
// rather than 208-byte entries, as egress-snat reads its dst-files.
func readPrefixes(name string) ([]netip.Prefix, error) {
	fh, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	var ps []netip.Prefix
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		p, err := netip.ParsePrefix(sc.Text())
		if err != nil {
			return nil, err
		}
		ps = append(ps, p.Masked())
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if a.Bits() != b.Bits() {
			return b.Bits() - a.Bits()
		}
		return a.Addr().Compare(b.Addr())
	})
	return ps, sc.Err()
}

// peakMB is the process's peak resident memory so far (VmHWM).
func peakMB() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb int
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &kb)
			return fmt.Sprintf("%.0f", float64(kb)/1024)
		}
	}
	return "?"
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f", float64(d.Microseconds())/1000) }

func apply(args []string) error {
	fs := flag.NewFlagSet("apply", flag.ExitOnError)
	ef := addEntryFlags(fs)
	lib := fs.Bool("lib", false, "write through google/nftables' Conn")
	drop := fs.Bool("drop", false, "drop the entries before the write")
	stream := fs.Bool("stream", false, "render from the prefixes through one reused entry (RenderSeq), without a slice of entries")
	fs.Parse(args)
	c, err := nft.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Delete(); err != nil {
		return err
	}
	t0 := time.Now()
	var es []snat.Entry
	var ps []netip.Prefix
	if *stream {
		ps, err = readPrefixes(*ef.file)
	} else {
		es, err = ef.entries()
	}
	if err != nil {
		return err
	}
	t1 := time.Now()
	peakRead := peakMB()
	var want *nft.Table
	if *stream {
		want, err = renderStream(ef, ps)
	} else {
		want, err = nft.Render(es)
	}
	if err != nil {
		return err
	}
	t2 := time.Now()
	peakRender := peakMB()
	n := len(es) + len(ps)
	if *drop {
		es = nil
		runtime.GC()
	}
	p := nft.Plan(nil, want)
	t3 := time.Now()
	if *lib {
		err = libWrite(want)
	} else {
		_, err = c.Run(p)
	}
	if err != nil {
		return err
	}
	t4 := time.Now()
	runtime.KeepAlive(es)
	fmt.Printf("mode=%s n=%d elements=%d sets=%d rules=%d read=%s render=%s plan=%s run=%s backend=%s total=%s peak_mb_read=%s peak_mb_render=%s peak_mb=%s\n",
		map[bool]string{true: "lib", false: "own"}[*lib], n, want.Elements(), len(want.Sets), len(want.Chain(nft.ChainNAT).Rules),
		ms(t1.Sub(t0)), ms(t2.Sub(t1)), ms(t3.Sub(t2)), ms(t4.Sub(t3)), ms(t4.Sub(t1)), ms(t4.Sub(t0)), peakRead, peakRender, peakMB())
	return nil
}

// libWrite writes a fresh table through google/nftables' Conn: what the
// prototype of issue 23 did. Its element lists are cut at 4,000 (the 64
// KiB limit of one message), and the socket buffers forced as large as the
// transaction.
func libWrite(t *nft.Table) error {
	force := func(c *netlink.Conn) error {
		raw, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		raw.Control(func(fd uintptr) {
			serr = errors.Join(unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 256<<20),
				unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20))
		})
		return serr
	}
	c, err := nftables.New(nftables.WithSockOptions(force))
	if err != nil {
		return err
	}
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: nft.TableName})
	prio := nftables.ChainPriority(nft.NATPriority)
	ch := c.AddChain(&nftables.Chain{Table: tbl, Name: nft.ChainNAT, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: &prio})
	for _, s := range t.Sets {
		kt := nftables.TypeIPAddr
		if s.Family == snat.IPv6 {
			kt = nftables.TypeIP6Addr
		}
		set := &nftables.Set{Table: tbl, Name: s.Name, KeyType: kt}
		if err := c.AddSet(set, nil); err != nil {
			return err
		}
		var els []nftables.SetElement
		for a := range s.Elems.All() {
			els = append(els, nftables.SetElement{Key: a.AsSlice()})
			if len(els) == 4000 {
				if err := c.SetAddElements(set, els); err != nil {
					return err
				}
				els = nil
			}
		}
		if len(els) > 0 {
			if err := c.SetAddElements(set, els); err != nil {
				return err
			}
		}
	}
	// The rules are few and change nothing in the figures: the sets and
	// their elements are the transaction.
	_ = ch
	return c.Flush()
}

// median of durations.
func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func change(args []string) error {
	fs := flag.NewFlagSet("change", flag.ExitOnError)
	ef := addEntryFlags(fs)
	rounds := fs.Int("rounds", 5, "moves each way")
	fs.Parse(args)
	c, err := nft.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Delete(); err != nil {
		return err
	}
	es, err := ef.entries()
	if err != nil {
		return err
	}
	other, err := netip.ParseAddr(*ef.other)
	if err != nil {
		return err
	}
	// The destination moved is the file's first; it joins the group of
	// -other, which has a few more so that it is a set too.
	first := es[0].Dst
	for i := range snat.SetThreshold {
		es = append(es, snat.Entry{Match: snat.Match{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(200 + i)}), 32), Out: *ef.out},
			Natural: es[0].Natural, To: []netip.Addr{other}})
	}
	snat.SortEntries(es)
	have, err := nft.Render(es)
	if err != nil {
		return err
	}
	if _, err := c.Run(nft.Plan(nil, have)); err != nil {
		return err
	}
	i := slices.IndexFunc(es, func(e snat.Entry) bool { return e.Dst == first })
	tos := []([]netip.Addr){{other}, es[i].To}
	var txn, full, patch []time.Duration
	var steps int
	for r := 0; r < 2**rounds; r++ {
		old := es[i]
		es[i].To = tos[r%2]
		if r%2 == 0 {
			// There: as a daemon that knows what changed, by Patch.
			t0 := time.Now()
			p, want, ok := nft.Patch(have, []snat.Entry{old}, []snat.Entry{es[i]})
			if !ok {
				return errors.New("the change could not be patched")
			}
			if _, err := c.Run(p); err != nil {
				return err
			}
			patch = append(patch, time.Since(t0))
			have = want
			continue
		}
		// Back: rendered and planned whole.
		t0 := time.Now()
		want, err := nft.Render(es)
		if err != nil {
			return err
		}
		t1 := time.Now()
		p := nft.Plan(have, want)
		if _, err := c.Run(p); err != nil {
			return err
		}
		t2 := time.Now()
		txn = append(txn, t2.Sub(t1))
		full = append(full, t2.Sub(t0))
		steps = len(p.Steps)
		have = want
	}
	fmt.Printf("n=%d moved=%s steps=%d patch_run=%s plan_run=%s render_plan_run=%s\n", len(es), first, steps, ms(median(patch)), ms(median(txn)), ms(median(full)))
	return nil
}

func oneshot(args []string) error {
	fs := flag.NewFlagSet("oneshot", flag.ExitOnError)
	dst := fs.String("dst", "", "destination prefix to move")
	from := fs.String("from", "", "the address it leaves with now")
	to := fs.String("to", "", "the address it moves to")
	fs.Parse(args)
	p, err := netip.ParsePrefix(*dst)
	if err != nil {
		return err
	}
	fa, err := netip.ParseAddr(*from)
	if err != nil {
		return err
	}
	ta, err := netip.ParseAddr(*to)
	if err != nil {
		return err
	}
	t0 := time.Now()
	c, err := nft.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	t, gen, err := c.ReadShape()
	if err != nil {
		return err
	}
	t1 := time.Now()
	setOf := func(a netip.Addr) string {
		for _, r := range t.Chain(nft.ChainNAT).Rules {
			if r.Set != "" && r.SetBits == p.Bits() && len(r.Action.To) == 1 && r.Action.To[0] == a {
				return r.Set
			}
		}
		return ""
	}
	sf, st := setOf(fa), setOf(ta)
	if sf == "" || st == "" {
		return fmt.Errorf("no /%d sets for %s and %s", p.Bits(), fa, ta)
	}
	prog := nft.Program{Steps: []nft.Step{
		nft.DeleteElements{Set: sf, Elems: nft.ElemsOf(snat.FamilyOf(p.Addr()), p.Addr())},
		nft.AddElements{Set: st, Elems: nft.ElemsOf(snat.FamilyOf(p.Addr()), p.Addr())},
	}}
	if err := c.RunAt(prog, gen); err != nil {
		return err
	}
	t2 := time.Now()
	fmt.Printf("readshape=%s run=%s total=%s\n", ms(t1.Sub(t0)), ms(t2.Sub(t1)), ms(t2.Sub(t0)))
	return nil
}

func read() error {
	c, err := nft.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	t0 := time.Now()
	if _, _, err := c.ReadShape(); err != nil {
		return err
	}
	t1 := time.Now()
	t, _, err := c.Read()
	if err != nil {
		return err
	}
	t2 := time.Now()
	fmt.Printf("elements=%d readshape=%s read=%s\n", t.Elements(), ms(t1.Sub(t0)), ms(t2.Sub(t1)))
	return nil
}

func script(args []string) error {
	fs := flag.NewFlagSet("script", flag.ExitOnError)
	ef := addEntryFlags(fs)
	fs.Parse(args)
	es, err := ef.entries()
	if err != nil {
		return err
	}
	t, err := nft.Render(es)
	if err != nil {
		return err
	}
	_, err = os.Stdout.WriteString(nft.Plan(nil, t).Show())
	return err
}

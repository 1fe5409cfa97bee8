// Command benchconn is the helper of scripts/bench.sh (make bench). It has
// four modes:
//
//	benchconn gen -n N [-seed S] [-last PREFIX] [-format list|linear] ...
//
// prints N unique, non-overlapping IPv4 destinations, /24 to /32 at random,
// inside 10.0.0.0/8, in a random order; the same seed always gives the same
// list. With -last, the list holds N-1 generated prefixes and then PREFIX,
// so a linear chain built from it matches PREFIX with its last rule. Format
// "list" is one prefix a line (a dst-file of `egress-snat apply`); format
// "linear" is the iptables-restore rules of the same destinations as one
// rule each:
//
//	-A CHAIN -s NATURAL/32 -d PREFIX -o OUT -j SNAT --to-source TO
//
//	benchconn loop IPTABLES RULES
//
// programs a chain the way a go-iptables user does: RULES holds lines
// "-A CHAIN spec...", and for each one it calls go-iptables' Append, which
// runs one IPTABLES process (the first rule of a chain also creates the chain
// and inserts a jump to it first in POSTROUTING).
//
//	benchconn serve -ports 7100-7115 [-net tcp4|tcp6|tcp]
//
// runs the far side (in the far namespace): on every port of the range, on
// all IPv4 addresses (-net: IPv6, or both), it answers each TCP connection with the address the
// connection came from and a newline, then closes it. It exits after
// -max-time, or on SIGINT/SIGTERM.
//
//	benchconn load -addrs 203.0.113.1,... -ports 7100-7115 -duration 3s -want 192.0.2.22 [-net tcp6] [-max N]
//
// opens short TCP connections from this namespace for a fixed time with
// -conc workers, over every address and port in turn (so that one SNAT
// address never runs out of 5-tuples), reads the server's line, and closes
// with SO_LINGER 0 so that no TIME_WAIT piles up. It prints one JSON object:
// completed connections, the rate, errors, and the source addresses the far
// side reported. It fails if nothing completed or if the far side saw any
// source other than -want.
//
//	benchconn hold -addr 203.0.113.1:7100 -n 12
//
// opens n TCP connections to one server address and port, one after the
// other, reads the source the far side saw on each, and keeps every one
// open until all were tried, so that each holds its NAT source port: the
// connections of a small --to-ports range run out. It prints one JSON
// object: tried, connected, failed, and the sources the far side reported.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "gen":
		err = gen(os.Args[2:])
	case "loop":
		err = loop(os.Args[2:])
	case "serve":
		err = serve(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "hold":
		err = hold(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchconn:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: benchconn gen|loop|serve|load|hold [flags] (see the package comment)")
	os.Exit(2)
}

// ---- gen ----

func gen(args []string) error {
	fs := flag.NewFlagSet("gen", flag.ExitOnError)
	n := fs.Int("n", 100, "number of destinations")
	seed := fs.Uint64("seed", 1, "random seed")
	last := fs.String("last", "", "make this `PREFIX` the last destination (N-1 generated ones before it)")
	format := fs.String("format", "list", "list or linear")
	chain := fs.String("chain", "BENCH-LINEAR", "linear: chain name")
	natural := fs.String("natural", "192.0.2.250", "linear: the natural source (-s)")
	to := fs.String("to", "192.0.2.22", "linear: the SNAT address (--to-source)")
	out := fs.String("out", "eth0", "linear: the outgoing interface (-o)")
	wide := fs.Int("wide", -1, "instead of random /24../32 blocks: N-`WIDE` random /32s in 10.0.0.0/8 and WIDE wider prefixes (/24, then /25 once the private /24s run out), which may hold some of the /32s, as a feed of hosts and networks does")
	fs.Parse(args)
	if *wide >= 0 {
		count := *n
		if *last != "" {
			count--
		}
		ps, err := mixed(count, *wide, *seed)
		if err != nil {
			return err
		}
		if *last != "" {
			p, err := netip.ParsePrefix(*last)
			if err != nil {
				return err
			}
			ps = append(ps, p)
		}
		w := bufio.NewWriterSize(os.Stdout, 1<<16)
		for _, p := range ps {
			w.WriteString(p.String() + "\n")
		}
		return w.Flush()
	}

	count := *n
	var lastP netip.Prefix
	if *last != "" {
		p, err := netip.ParsePrefix(*last)
		if err != nil {
			return err
		}
		lastP = p
		count--
	}
	if count < 0 {
		return errors.New("-n must be at least 1 with -last")
	}
	ps, err := prefixes(count, *seed)
	if err != nil {
		return err
	}
	if lastP.IsValid() {
		if lastP.Overlaps(netip.MustParsePrefix("10.0.0.0/8")) {
			return errors.New("-last must lie outside 10.0.0.0/8")
		}
		ps = append(ps, lastP)
	}
	w := bufio.NewWriterSize(os.Stdout, 1<<16)
	for _, p := range ps {
		switch *format {
		case "list":
			fmt.Fprintln(w, p)
		case "linear":
			fmt.Fprintf(w, "-A %s -s %s/32 -d %s -o %s -j SNAT --to-source %s\n", *chain, *natural, p, *out, *to)
		default:
			return fmt.Errorf("-format %q: want list or linear", *format)
		}
	}
	return w.Flush()
}

// prefixes allocates n aligned blocks of random length /24../32 one after
// the other, with small random gaps, from 10.0.0.0, then shuffles them.
// Blocks never overlap, so every destination is unique and no rule shadows
// another.
func prefixes(n int, seed uint64) ([]netip.Prefix, error) {
	r := rand.New(rand.NewPCG(seed, 0x65677265737321))
	const base, end = uint32(10) << 24, uint32(11) << 24
	cur := base
	out := make([]netip.Prefix, 0, n)
	for range n {
		bits := 24 + r.IntN(9)
		size := uint32(1) << (32 - bits)
		cur = (cur + size - 1) &^ (size - 1)
		if cur+size > end || cur < base {
			return nil, fmt.Errorf("%d destinations do not fit in 10.0.0.0/8", n)
		}
		var a [4]byte
		a[0], a[1], a[2], a[3] = byte(cur>>24), byte(cur>>16), byte(cur>>8), byte(cur)
		out = append(out, netip.PrefixFrom(netip.AddrFrom4(a), bits))
		cur += size + uint32(r.IntN(32))
	}
	r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, nil
}

// mixed returns n-wide unique random /32s in 10.0.0.0/8 and wide unique
// /24s, from the private and benchmark ranges in turn (10/8, 100.64/10,
// 172.16/12, 198.18/15, 192.168/16: 86,784 /24s), then /25s of the same
// ranges, shuffled. A million destinations cannot be disjoint in private
// space, so /32s may fall inside a /24 of the same list.
func mixed(n, wide int, seed uint64) ([]netip.Prefix, error) {
	if wide > n {
		return nil, errors.New("-wide must be at most -n (less one with -last)")
	}
	r := rand.New(rand.NewPCG(seed, 0x6d69786564))
	out := make([]netip.Prefix, 0, n)
	hosts := n - wide
	if hosts > 1<<23 {
		return nil, fmt.Errorf("%d /32s do not fit in half of 10.0.0.0/8", hosts)
	}
	seen := make(map[uint32]bool, hosts)
	for len(out) < hosts {
		a := uint32(10)<<24 | r.Uint32()&0xffffff
		if seen[a] {
			continue
		}
		seen[a] = true
		out = append(out, netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), 32))
	}
	ranges := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("172.16.0.0/12"), netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("192.168.0.0/16")}
	for _, bits := range []int{24, 25} {
		for _, rg := range ranges {
			base := rg.Addr().As4()
			start := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
			count := uint32(1) << (bits - rg.Bits())
			for i := uint32(0); i < count && len(out) < n; i++ {
				a := start + i<<(32-bits)
				out = append(out, netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), bits))
			}
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("%d wide prefixes do not fit in the private ranges", wide)
	}
	r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, nil
}

// ---- loop ----

func loop(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: benchconn loop IPTABLES RULES")
	}
	ipt, err := iptables.New(iptables.Path(args[0]))
	if err != nil {
		return err
	}
	f, err := os.Open(args[1])
	if err != nil {
		return err
	}
	defer f.Close()
	made := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		w := strings.Fields(sc.Text())
		if len(w) < 3 || w[0] != "-A" {
			continue
		}
		if !made[w[1]] {
			if err := ipt.NewChain("nat", w[1]); err != nil {
				return err
			}
			if err := ipt.Insert("nat", "POSTROUTING", 1, "-j", w[1]); err != nil {
				return err
			}
			made[w[1]] = true
		}
		if err := ipt.Append("nat", w[1], w[2:]...); err != nil {
			return err
		}
	}
	return sc.Err()
}

// ---- serve ----

func parsePorts(s string) ([]int, error) {
	lo, hi, found := strings.Cut(s, "-")
	a, err := strconv.Atoi(lo)
	if err != nil {
		return nil, fmt.Errorf("ports %q: %w", s, err)
	}
	b := a
	if found {
		if b, err = strconv.Atoi(hi); err != nil {
			return nil, fmt.Errorf("ports %q: %w", s, err)
		}
	}
	if a < 1 || b > 65535 || b < a {
		return nil, fmt.Errorf("ports %q: want LO-HI within 1-65535", s)
	}
	var out []int
	for p := a; p <= b; p++ {
		out = append(out, p)
	}
	return out, nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	ports := fs.String("ports", "7100-7115", "TCP port range LO-HI")
	maxTime := fs.Duration("max-time", 30*time.Minute, "exit after this long in any case")
	network := fs.String("net", "tcp4", "tcp4, tcp6, or tcp for both families")
	fs.Parse(args)
	ps, err := parsePorts(*ports)
	if err != nil {
		return err
	}
	var served atomic.Int64
	for _, p := range ps {
		ln, err := net.Listen(*network, ":"+strconv.Itoa(p))
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue // e.g. ECONNABORTED: the client reset first
				}
				peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				c.SetWriteDeadline(time.Now().Add(2 * time.Second))
				c.Write([]byte(peer.String() + "\n"))
				c.Close()
				served.Add(1)
			}
		}()
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-sig:
	case <-time.After(*maxTime):
	}
	fmt.Fprintf(os.Stderr, "benchconn serve: answered %d connections\n", served.Load())
	return nil
}

// ---- load ----

type result struct {
	Conns    int64            `json:"conns"`
	Seconds  float64          `json:"seconds"`
	Rate     float64          `json:"rate"`
	Errors   int64            `json:"errors"`
	FirstErr string           `json:"first_error,omitempty"`
	Seen     map[string]int64 `json:"seen"`
}

func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	addrList := fs.String("addrs", "203.0.113.1", "server addresses, comma-separated")
	ports := fs.String("ports", "7100-7115", "server TCP port range LO-HI")
	dur := fs.Duration("duration", 3*time.Second, "how long to open connections")
	conc := fs.Int("conc", 8, "concurrent workers")
	want := fs.String("want", "", "fail unless the far side sees every connection from this address")
	maxConns := fs.Int64("max", 2_000_000, "stop after this many connections in any case")
	network := fs.String("net", "tcp4", "tcp4 or tcp6 (the family of -addrs)")
	fs.Parse(args)
	ps, err := parsePorts(*ports)
	if err != nil {
		return err
	}
	var targets []string
	for _, a := range strings.Split(*addrList, ",") {
		ad, err := netip.ParseAddr(strings.TrimSpace(a))
		if err != nil {
			return err
		}
		for _, p := range ps {
			targets = append(targets, netip.AddrPortFrom(ad, uint16(p)).String())
		}
	}

	var (
		next     atomic.Int64
		done     atomic.Int64
		errs     atomic.Int64
		mu       sync.Mutex
		firstErr string
		seen     = map[string]int64{}
		wg       sync.WaitGroup
	)
	d := net.Dialer{Timeout: time.Second}
	start := time.Now()
	deadline := start.Add(*dur)
	for w := 0; w < *conc; w++ {
		wg.Go(func() {
			local := map[string]int64{}
			buf := make([]byte, 64)
			for time.Now().Before(deadline) {
				i := next.Add(1)
				if i > *maxConns {
					break
				}
				src, err := once(&d, *network, targets[int(i)%len(targets)], buf)
				if err != nil {
					if errs.Add(1) == 1 {
						mu.Lock()
						firstErr = err.Error()
						mu.Unlock()
					}
					continue
				}
				local[src]++
				done.Add(1)
			}
			mu.Lock()
			for k, v := range local {
				seen[k] += v
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	res := result{Conns: done.Load(), Seconds: el, Rate: float64(done.Load()) / el, Errors: errs.Load(), FirstErr: firstErr, Seen: seen}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return err
	}
	if res.Conns == 0 {
		return fmt.Errorf("no connection completed (first error: %s)", firstErr)
	}
	if *want != "" && (len(seen) != 1 || seen[*want] != res.Conns) {
		return fmt.Errorf("the far side saw sources %v, want all from %s", seen, *want)
	}
	return nil
}

// once opens one connection, reads the source address the server saw, and
// closes with an RST (SO_LINGER 0): the client keeps no TIME_WAIT, so its
// ephemeral ports never run out however fast it goes.
func once(d *net.Dialer, network, target string, buf []byte) (string, error) {
	c, err := d.Dial(network, target)
	if err != nil {
		return "", err
	}
	tc := c.(*net.TCPConn)
	defer func() {
		tc.SetLinger(0)
		tc.Close()
	}()
	tc.SetReadDeadline(time.Now().Add(time.Second))
	n := 0
	for {
		m, err := tc.Read(buf[n:])
		n += m
		if i := strings.IndexByte(string(buf[:n]), '\n'); i >= 0 {
			return string(buf[:i]), nil
		}
		if err != nil || n == len(buf) {
			return "", fmt.Errorf("reading from %s: %v", target, err)
		}
	}
}

// ---- hold ----

func hold(args []string) error {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	addr := fs.String("addr", "203.0.113.1:7100", "server ADDRESS:PORT")
	n := fs.Int("n", 12, "connections to try")
	timeout := fs.Duration("timeout", time.Second, "how long one connection may take to connect and answer")
	network := fs.String("net", "tcp4", "tcp4 or tcp6")
	gap := fs.Duration("gap", 0, "pause between connections (for a daemon's tick to act, such as watch's spill)")
	fs.Parse(args)
	var (
		open []net.Conn
		res  = struct {
			Tried     int              `json:"tried"`
			Connected int              `json:"connected"`
			Failed    int              `json:"failed"`
			FirstErr  string           `json:"first_error,omitempty"`
			Seen      map[string]int64 `json:"seen"`
		}{Seen: map[string]int64{}}
	)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	d := net.Dialer{Timeout: *timeout}
	buf := make([]byte, 64)
	for i := range *n {
		if i > 0 {
			time.Sleep(*gap)
		}
		res.Tried++
		src, c, err := ask(&d, *network, *addr, buf, *timeout)
		if err != nil {
			if res.Failed == 0 {
				res.FirstErr = err.Error()
			}
			res.Failed++
			continue
		}
		open = append(open, c)
		res.Connected++
		res.Seen[src]++
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// ask connects, reads the source the server saw, and returns the
// connection still open.
func ask(d *net.Dialer, network, target string, buf []byte, timeout time.Duration) (string, net.Conn, error) {
	c, err := d.Dial(network, target)
	if err != nil {
		return "", nil, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if i := strings.IndexByte(string(buf[:n]), '\n'); i >= 0 {
			return string(buf[:i]), c, nil
		}
		if err != nil || n == len(buf) {
			c.Close()
			return "", nil, fmt.Errorf("reading from %s: %v", target, err)
		}
	}
}

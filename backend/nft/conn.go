package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// Conn talks to nftables in one network namespace: transactions and
// element dumps over a netlink socket of its own, the rest of reads
// through google/nftables. A Conn is not safe for concurrent use.
type Conn struct {
	nl  *netlink.Conn
	lib *nftables.Conn
	seq uint32
}

// Option configures Open.
type Option func(*config)

type config struct{ netns int }

// WithNetNS makes the Conn work in the network namespace fd refers to
// (as /run/netns/NAME opened), without moving any thread of the caller.
func WithNetNS(fd int) Option { return func(c *config) { c.netns = fd } }

// Open opens a Conn, in the caller's network namespace unless WithNetNS.
func Open(opts ...Option) (*Conn, error) {
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	nl, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: cfg.netns})
	if err != nil {
		return nil, fmt.Errorf("opening a netfilter netlink socket: %w", err)
	}
	// Errors name what the kernel disliked (extended acknowledgements),
	// and do not echo the failing message, which can be 64 KiB of
	// elements (capped acknowledgements).
	for _, o := range []netlink.ConnOption{netlink.ExtendedAcknowledge, netlink.CapAcknowledge} {
		if err := nl.SetOption(o, true); err != nil {
			nl.Close()
			return nil, fmt.Errorf("netlink socket option %v: %w", o, err)
		}
	}
	lib, err := nftables.New(nftables.WithNetNSFd(cfg.netns), nftables.AsLasting())
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("opening nftables: %w", err)
	}
	return &Conn{nl: nl, lib: lib, seq: uint32(time.Now().Unix())}, nil
}

// Close closes the Conn's sockets.
func (c *Conn) Close() error {
	return errors.Join(c.nl.Close(), c.lib.CloseLasting())
}

// ErrChanged says that nftables is not what the program was planned
// against: the generation changed (RunAt), or the table differs (an element
// to delete is missing, a set to delete is still used). Read the table
// again and plan anew.
var ErrChanged = errors.New("nftables changed since the plan was made")

// StepError is the kernel's refusal of one step of a transaction. The
// whole transaction was then rolled back.
type StepError struct {
	Step  string // the step as nft(8) would write it, shortened
	Errno syscall.Errno
	// Msg is the kernel's explanation (extended acknowledgement), if any.
	Msg string
}

func (e *StepError) Error() string {
	s := fmt.Sprintf("nftables refused %q: %v", e.Step, e.Errno)
	if e.Msg != "" {
		s += " (" + e.Msg + ")"
	}
	return s
}

func (e *StepError) Unwrap() error { return e.Errno }

// Is makes errors.Is(err, ErrChanged) true for the refusals a stale plan
// causes.
func (e *StepError) Is(target error) bool {
	return target == ErrChanged && (e.Errno == unix.ENOENT || e.Errno == unix.EBUSY || e.Errno == unix.ERESTART)
}

// Generation returns nftables' ruleset generation in the namespace: a
// number every committed transaction (of anyone, in any table) increases
// by one. It is the cheap canary: unchanged since our last write, nothing
// changed, and the table needs no read.
func (c *Conn) Generation() (uint32, error) {
	msgs, err := c.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN), Flags: netlink.Request},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, fmt.Errorf("reading the nftables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < nfgenLen {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[nfgenLen:])
		if err != nil {
			return 0, err
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("reading the nftables generation: no generation in the answer")
}

// Run sends p as one transaction and returns the generation it made (or,
// for an empty program, which sends nothing, the current one). The kernel
// applies all of it or none. Run only makes sure that the generation it
// returns is exactly its own commit's, to compare later ones with; that p
// fits the kernel's table is RunAt's business.
func (c *Conn) Run(p Program) (uint32, error) {
	for try := 0; ; try++ {
		g, err := c.Generation()
		if err != nil {
			return 0, err
		}
		if p.Empty() {
			return g, nil
		}
		err = c.RunAt(p, g)
		if errors.Is(err, unix.ERESTART) && try < 3 {
			continue // someone committed in between: p does not depend on it
		}
		if err != nil {
			return 0, err
		}
		return nextGen(g), nil
	}
}

// nextGen is the generation a commit makes from g: the kernel skips 0.
func nextGen(g uint32) uint32 {
	if g+1 == 0 {
		return 1
	}
	return g + 1
}

// RunAt sends p as one transaction that the kernel refuses, with
// ErrChanged, unless the ruleset's generation is still gen: the plan's
// view is then known to be the kernel's.
func (c *Conn) RunAt(p Program, gen uint32) error {
	if p.Empty() {
		return nil
	}
	seq := c.seq
	buf, steps, err := encodeProgram(p, seq, gen)
	if err != nil {
		return err
	}
	c.seq += uint32(len(steps) + 2)
	raw, err := c.nl.SyscallConn()
	if err != nil {
		return err
	}
	// One transaction is one message to the kernel, so the socket's send
	// buffer must hold it whole (the kernel doubles what it is given);
	// the receive buffer holds one acknowledgement and the errors.
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = errors.Join(
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, max(len(buf), 1<<20)),
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20))
	}); err != nil || serr != nil {
		return fmt.Errorf("sizing the netlink socket's buffers for %d bytes: %w", len(buf), errors.Join(err, serr))
	}
	if err := raw.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return serr != unix.EAGAIN
	}); err != nil || serr != nil {
		return fmt.Errorf("sending a transaction of %d bytes: %w", len(buf), errors.Join(err, serr))
	}
	// The kernel handled the whole batch inside sendto: its answers are
	// all queued. The deadline only guards against a kernel that does not
	// answer.
	c.nl.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.nl.SetReadDeadline(time.Time{})
	last := seq + uint32(len(steps))
	var errs []error
	rbuf := make([]byte, 1<<16)
	for {
		var n int
		if err := raw.Read(func(fd uintptr) bool {
			n, _, serr = unix.Recvfrom(int(fd), rbuf, 0)
			return serr != unix.EAGAIN
		}); err != nil || serr != nil {
			return fmt.Errorf("reading the answer to a transaction: %w", errors.Join(append(errs, err, serr)...))
		}
		msgs, err := syscall.ParseNetlinkMessage(rbuf[:n])
		if err != nil {
			return fmt.Errorf("reading the answer to a transaction: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				errs = append(errs, stepError(p, steps, seq, m, syscall.Errno(-code)))
			}
			if m.Header.Seq == last || m.Header.Seq == seq {
				// The last message's acknowledgement comes after every
				// error; an error for the batch itself (a generation
				// that changed, a failed commit) ends it too.
				if m.Header.Seq == seq && len(errs) > 0 && errs[len(errs)-1].(*StepError).Errno == unix.ERESTART {
					return fmt.Errorf("%w: %w", ErrChanged, errs[len(errs)-1])
				}
				return errors.Join(errs...)
			}
		}
	}
}

// stepError names the step an error message answers.
func stepError(p Program, steps []int, seq uint32, m syscall.NetlinkMessage, errno syscall.Errno) error {
	e := &StepError{Errno: errno, Step: "the transaction"}
	if i := int(m.Header.Seq) - int(seq) - 1; i >= 0 && i < len(steps) {
		e.Step = p.Steps[steps[i]].Show()
		if len(e.Step) > 200 {
			e.Step = e.Step[:200] + "..."
		}
	}
	// Extended acknowledgement attributes follow the error code and the
	// failing message's header (its payload is not echoed: capped).
	if m.Header.Flags&unix.NLM_F_ACK_TLVS != 0 && len(m.Data) > 4+unix.SizeofNlMsghdr {
		ad, err := netlink.NewAttributeDecoder(m.Data[4+unix.SizeofNlMsghdr:])
		if err == nil {
			for ad.Next() {
				if ad.Type() == unix.NLMSGERR_ATTR_MSG {
					e.Msg = ad.String()
				}
			}
		}
	}
	return e
}

// Delete deletes our table and everything in it, in one message. It is no
// error if there is none. Connections our rules NATed lose their
// translation if no other nat chain is left in the namespace: see the
// package comment.
func (c *Conn) Delete() error {
	_, err := c.Run(Program{Steps: []Step{DeleteTable{}}})
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	return err
}

// Read reads our table whole (nil if there is none): chains, rules with
// their counters, sets with their elements, and the generation it saw.
// Reading the elements of big sets is slow (a dump of a million elements
// takes seconds): it is for the slow path. ReadShape reads the rest.
func (c *Conn) Read() (*Table, uint32, error) { return c.read(true) }

// ReadShape is Read without the sets' elements: chains, rules, counters,
// set names. It is cheap whatever the number of destinations.
func (c *Conn) ReadShape() (*Table, uint32, error) { return c.read(false) }

// read retries until the generation is the same before and after, so the
// table read is one the kernel had.
func (c *Conn) read(elems bool) (*Table, uint32, error) {
	for try := 0; ; try++ {
		g0, err := c.Generation()
		if err != nil {
			return nil, 0, err
		}
		t, err := c.readOnce(elems)
		if errors.Is(err, errTornDump) && try < 8 {
			time.Sleep(time.Duration(try+1) * 100 * time.Millisecond)
			continue
		}
		if err != nil {
			return nil, 0, err
		}
		g1, err := c.Generation()
		if err != nil {
			return nil, 0, err
		}
		if g0 == g1 {
			return t, g1, nil
		}
		if try >= 4 {
			return nil, 0, fmt.Errorf("nftables changed during each of %d reads of table inet %s", try+1, TableName)
		}
	}
}

var hookNames = map[uint32]string{
	unix.NF_INET_PRE_ROUTING: "prerouting", unix.NF_INET_LOCAL_IN: "input", unix.NF_INET_FORWARD: "forward",
	unix.NF_INET_LOCAL_OUT: "output", unix.NF_INET_POST_ROUTING: "postrouting",
}

// chainOrder is the order of our chains in a Table.
var chainOrder = []string{ChainNAT, ChainMarkOut, ChainMarkFwd, ChainHold}

func (c *Conn) readOnce(elems bool) (*Table, error) {
	tbl, err := c.lib.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading table inet %s: %w", TableName, err)
	}
	t := &Table{}
	sets, err := c.lib.GetSets(tbl)
	if err != nil {
		return nil, fmt.Errorf("reading the sets of table inet %s: %w", TableName, err)
	}
	counts, err := c.setCounts()
	if err != nil {
		return nil, fmt.Errorf("counting the elements of the sets of table inet %s: %w", TableName, err)
	}
	anon := map[string]*nftables.Set{}
	for _, s := range sets {
		if s.Anonymous {
			anon[s.Name] = s
			continue
		}
		set, ok := parseSetName(s.Name)
		if !ok || s.IsMap || s.Interval || s.KeyType.Bytes != uint32(maskAddr(set.Family, 0).BitLen()/8) {
			t.Foreign = append(t.Foreign, "set "+s.Name)
			set = Set{Name: s.Name, Bits: -1}
		}
		set.Elems = NewElems(set.Family)
		set.Count = counts[s.Name]
		if elems && set.Bits >= 0 {
			if set.Elems, err = c.elements(s.Name, set.Family); err != nil {
				return nil, err
			}
		}
		t.Sets = append(t.Sets, set)
	}
	slices.SortFunc(t.Sets, func(a, b Set) int { return strings.Compare(a.Name, b.Name) })

	spread := func(name string) ([]netip.Addr, error) {
		s := anon[name]
		if s == nil {
			return nil, fmt.Errorf("no such map")
		}
		els, err := c.lib.GetSetElements(s)
		if err != nil {
			return nil, err
		}
		to := make([]netip.Addr, len(els))
		for _, e := range els {
			a, ok := netip.AddrFromSlice(e.Val)
			if len(e.Key) != 4 || !ok {
				return nil, fmt.Errorf("element %x : %x is not a counter and an address", e.Key, e.Val)
			}
			i := binary.NativeEndian.Uint32(e.Key)
			if int(i) >= len(to) || to[i].IsValid() {
				return nil, fmt.Errorf("element %d out of order", i)
			}
			to[i] = a
		}
		return to, nil
	}
	chains, err := c.lib.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("reading the chains of table inet %s: %w", TableName, err)
	}
	for _, ch := range chains {
		if ch.Table.Name != TableName {
			continue
		}
		out := Chain{Name: ch.Name}
		if ch.Hooknum != nil && ch.Priority != nil {
			out.Hook = Hook{Type: string(ch.Type), Hook: hookNames[uint32(*ch.Hooknum)], Priority: int32(*ch.Priority)}
		}
		if ch.Policy != nil && *ch.Policy != nftables.ChainPolicyAccept || !slices.Contains(chainOrder, ch.Name) {
			t.Foreign = append(t.Foreign, "chain "+ch.Name)
			out.Hook.Type += " (foreign)" // never equal to ours: Plan deletes it
		}
		rules, err := c.lib.GetRules(tbl, ch)
		if err != nil {
			return nil, fmt.Errorf("reading chain %s of table inet %s: %w", ch.Name, TableName, err)
		}
		for _, r := range rules {
			d, err := decodeRule(r.Exprs, spread)
			if err != nil {
				t.Foreign = append(t.Foreign, fmt.Sprintf("rule %d of chain %s: %v", r.Handle, ch.Name, err))
				d = Rule{Action: Action{Kind: ActionKind("foreign rule " + strconv.FormatUint(r.Handle, 10))}}
			}
			d.Comment = ruleComment(r.UserData)
			out.Rules = append(out.Rules, d)
		}
		t.Chains = append(t.Chains, out)
	}
	slices.SortStableFunc(t.Chains, func(a, b Chain) int {
		ia, ib := slices.Index(chainOrder, a.Name), slices.Index(chainOrder, b.Name)
		if ia < 0 {
			ia = len(chainOrder)
		}
		if ib < 0 {
			ib = len(chainOrder)
		}
		if ia != ib {
			return ia - ib
		}
		return strings.Compare(a.Name, b.Name)
	})
	return t, nil
}

// parseSetName reads family and prefix length from a set name of ours
// ("d4-24-0123456789").
func parseSetName(name string) (Set, bool) {
	parts := strings.Split(name, "-")
	if len(parts) != 3 || len(parts[0]) != 2 || !strings.ContainsRune("dmh", rune(parts[0][0])) {
		return Set{}, false
	}
	var f snat.Family
	switch parts[0][1] {
	case '4':
		f = snat.IPv4
	case '6':
		f = snat.IPv6
	default:
		return Set{}, false
	}
	bits, err := strconv.Atoi(parts[1])
	if err != nil || bits < 1 || bits > maskAddr(f, 0).BitLen() {
		return Set{}, false
	}
	return Set{Name: name, Family: f, Bits: bits}, true
}

// errTornDump says that a dump of a set saw some elements twice, and as
// many not at all. The kernel dumps a set a buffer at a time, walking it
// again from the start and skipping what it sent; a hash set that grows
// rehashes in the background for a while after a big insert, and a walk
// then goes in another order. Found right after writing a million
// elements: 900,000 elements dumped, 53,120 of them twice. No commit
// happens, so the generation does not tell; the duplicates do.
var errTornDump = errors.New("a set changed its order during its dump")

// elements reads a set's elements, packed and sorted. It dumps them
// itself rather than through google/nftables, which makes a SetElement
// (and several allocations) of each and holds every message of the dump:
// at a million elements that was 500 MB and most of the time. Here the
// answers are read into one buffer and decoded straight into the packed
// keys.
func (c *Conn) elements(set string, f snat.Family) (Elems, error) {
	e := NewElems(f)
	err := c.dump(unix.NFT_MSG_GETSETELEM, func(b *batch) {
		b.str(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
		b.str(unix.NFTA_SET_ELEM_LIST_SET, set)
	}, func(data []byte) error {
		for typ, list := range attrs(data) {
			if typ != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
				continue
			}
			for _, el := range attrs(list) {
				for typ, key := range attrs(el) {
					if typ != unix.NFTA_SET_ELEM_KEY {
						continue
					}
					for typ, v := range attrs(key) {
						if typ == unix.NFTA_DATA_VALUE {
							if len(v) != e.width {
								return fmt.Errorf("element %x is not an address of its family", v)
							}
							e.b = append(e.b, v...)
						}
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		return Elems{}, fmt.Errorf("reading the elements of set %s: %w", set, err)
	}
	n := e.Len()
	e.normalize()
	if e.Len() != n {
		return Elems{}, fmt.Errorf("%w: set %s gave %d elements, %d of them twice", errTornDump, set, n, n-e.Len())
	}
	return e, nil
}

// nftaSetCount is the kernel's count of a set's elements in its
// description (NFTA_SET_COUNT, Linux 6.17 and later).
const nftaSetCount = 20

// setCounts returns the kernel's element count of each set of our table,
// by name, without dumping an element: -1 for every set when the kernel
// does not report counts.
func (c *Conn) setCounts() (map[string]int, error) {
	out := map[string]int{}
	err := c.dump(unix.NFT_MSG_GETSET, func(b *batch) {
		b.str(unix.NFTA_SET_TABLE, TableName)
	}, func(data []byte) error {
		name, count := "", -1
		for typ, v := range attrs(data) {
			switch typ {
			case unix.NFTA_SET_NAME:
				name = strings.TrimRight(string(v), "\x00")
			case nftaSetCount:
				if len(v) == 4 {
					count = int(binary.BigEndian.Uint32(v))
				}
			}
		}
		out[name] = count
		return nil
	})
	return out, err
}

// dump sends a dump request of type typ (an NFT_MSG_GET*) for family inet
// with the attributes put writes, and calls each with every answer's
// attributes until the dump is done, reading the answers into one buffer.
func (c *Conn) dump(typ int, put func(*batch), each func([]byte) error) error {
	b := &batch{count: true}
	req := func() {
		m := b.begin(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|typ), unix.NLM_F_DUMP, unix.NFPROTO_INET, 0)
		put(b)
		b.end(m)
	}
	req()
	b = &batch{buf: make([]byte, b.n), seq: c.seq}
	req()
	c.seq++
	raw, err := c.nl.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b.buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return serr != unix.EAGAIN
	}); err != nil || serr != nil {
		return errors.Join(err, serr)
	}
	c.nl.SetReadDeadline(time.Now().Add(time.Minute))
	defer c.nl.SetReadDeadline(time.Time{})
	rbuf := make([]byte, 1<<16)
	for {
		var n int
		if err := raw.Read(func(fd uintptr) bool {
			n, _, serr = unix.Recvfrom(int(fd), rbuf, 0)
			return serr != unix.EAGAIN
		}); err != nil || serr != nil {
			return errors.Join(err, serr)
		}
		msgs, err := syscall.ParseNetlinkMessage(rbuf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != b.seq-1 {
				continue // an answer to something else
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
						return syscall.Errno(-code)
					}
				}
				continue
			}
			if len(m.Data) < nfgenLen {
				continue
			}
			if err := each(m.Data[nfgenLen:]); err != nil {
				return err
			}
		}
	}
}

// attrs yields the netlink attributes in b: type (without flags) and
// payload.
func attrs(b []byte) iter.Seq2[uint16, []byte] {
	return func(yield func(uint16, []byte) bool) {
		for len(b) >= attrHdrLen {
			l := int(binary.NativeEndian.Uint16(b))
			if l < attrHdrLen || l > len(b) {
				return
			}
			typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
			if !yield(typ, b[attrHdrLen:l]) {
				return
			}
			b = b[min(align4(l), len(b)):]
		}
	}
}

// ruleComment reads the comment from a rule's userdata.
func ruleComment(ud []byte) string {
	for len(ud) >= 2 {
		typ, l := ud[0], int(ud[1])
		if len(ud) < 2+l {
			break
		}
		if typ == udataRuleComment && l > 0 {
			return strings.TrimRight(string(ud[2:2+l]), "\x00")
		}
		ud = ud[2+l:]
	}
	return ""
}

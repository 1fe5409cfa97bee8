package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Probe ports on G.
const (
	TCPPort = 7000
	UDPPort = 7001
	// TCPFlowPort serves long-lived TCP connections (TCPFlow): each line
	// is answered with the peer's IP, and the connection stays open.
	TCPFlowPort = 7002
)

const probeTimeout = 2 * time.Second

// StartProbe starts the far-side servers inside G: on TCPPort a server that
// writes the peer's IP and a newline and closes, on UDPPort a server that
// answers each datagram with the sender's IP, both for IPv4 and IPv6. The
// peer address is what G really saw, i.e. the address after H's SNAT.
// The servers run in this process and stop at t's cleanup.
func (l *Lab) StartProbe(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	if l.probing {
		l.mu.Unlock()
		t.Fatal("lab: StartProbe called twice")
	}
	l.probing = true
	l.mu.Unlock()

	var (
		tcp, flows []net.Listener
		udp        []*net.UDPConn
	)
	// Separate IPv4 and V6ONLY IPv6 sockets so the peer address is never a
	// v4-mapped IPv6 address.
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		return control(c, func(fd int) error {
			if strings.HasSuffix(network, "6") {
				if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
					return err
				}
				if strings.HasPrefix(network, "udp") {
					return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
				}
			} else if strings.HasPrefix(network, "udp") {
				return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
			}
			return nil
		})
	}}
	err := Do(l.Gateway, func() error {
		for _, fam := range []struct{ tcp, udp, host string }{
			{"tcp4", "udp4", "0.0.0.0"},
			{"tcp6", "udp6", "::"},
		} {
			ln, err := lc.Listen(context.Background(), fam.tcp, net.JoinHostPort(fam.host, fmt.Sprint(TCPPort)))
			if err != nil {
				return err
			}
			tcp = append(tcp, ln)
			fl, err := lc.Listen(context.Background(), fam.tcp, net.JoinHostPort(fam.host, fmt.Sprint(TCPFlowPort)))
			if err != nil {
				return err
			}
			flows = append(flows, fl)
			pc, err := lc.ListenPacket(context.Background(), fam.udp, net.JoinHostPort(fam.host, fmt.Sprint(UDPPort)))
			if err != nil {
				return err
			}
			udp = append(udp, pc.(*net.UDPConn))
		}
		return nil
	})
	var wg sync.WaitGroup
	var conns sync.Map // the flow connections open, closed at cleanup
	t.Cleanup(func() {
		for _, ln := range append(tcp, flows...) {
			ln.Close()
		}
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		for _, c := range udp {
			c.Close()
		}
		wg.Wait()
	})
	if err != nil {
		t.Fatalf("lab: start probe in %s: %v", l.Gateway, err)
	}
	for _, ln := range tcp {
		wg.Go(func() { l.serveTCP(ln) })
	}
	for _, c := range udp {
		wg.Go(func() { serveUDP(c) })
	}
	for _, ln := range flows {
		wg.Go(func() { serveFlows(ln, &conns, &wg) })
	}
}

// serveFlows answers each line of each connection with the peer's IP and
// keeps the connection open until the peer closes it or cleanup does.
func serveFlows(ln net.Listener, conns *sync.Map, wg *sync.WaitGroup) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return // closed by cleanup
		}
		conns.Store(c, true)
		wg.Go(func() {
			defer func() { c.Close(); conns.Delete(c) }()
			r := bufio.NewReader(c)
			ip := peerIP(c.RemoteAddr())
			for {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				if _, err := c.Write([]byte(ip + "\n")); err != nil {
					return
				}
			}
		})
	}
}

func control(c syscall.RawConn, fn func(fd int) error) error {
	var err error
	if cerr := c.Control(func(fd uintptr) { err = fn(int(fd)) }); cerr != nil {
		return cerr
	}
	return err
}

func (l *Lab) serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return // closed by cleanup
		}
		ip := peerIP(c.RemoteAddr())
		l.mu.Lock()
		l.seen[ip]++
		l.mu.Unlock()
		c.SetWriteDeadline(time.Now().Add(probeTimeout))
		c.Write([]byte(ip + "\n"))
		c.Close()
	}
}

// serveUDP answers from the address the datagram was sent to. Without that,
// G would pick the reply source by routing (192.0.2.1 rather than the far
// host 198.51.100.4 on lo), and H's connected socket would drop the reply.
func serveUDP(c *net.UDPConn) {
	buf := make([]byte, 1500)
	oob := make([]byte, 512)
	for {
		_, oobn, _, from, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		reply := []byte(from.Addr().Unmap().String())
		c.WriteMsgUDPAddrPort(reply, replyPktinfo(oob[:oobn]), from)
	}
}

// replyPktinfo turns the received IP_PKTINFO/IPV6_PKTINFO into the control
// message that makes the reply leave from the original destination address.
func replyPktinfo(oob []byte) []byte {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			var out unix.Inet4Pktinfo
			copy(out.Spec_dst[:], m.Data[8:12]) // ipi_addr: the header's destination
			return unix.PktInfo4(&out)
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			var out unix.Inet6Pktinfo
			copy(out.Addr[:], m.Data[:16])
			return unix.PktInfo6(&out)
		}
	}
	return nil
}

func peerIP(a net.Addr) string {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return a.String()
	}
	return ap.Addr().Unmap().String()
}

// Seen returns how many TCP probe connections arrived from each source
// address since the start or the last ResetSeen. UDP datagrams are not
// counted; UDPFlow.Ask reports those directly.
func (l *Lab) Seen() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.seen)
}

// ResetSeen forgets all counted connections.
func (l *Lab) ResetSeen() {
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.seen)
}

// SourceSeen connects from H to dst:TCPPort and returns the source address
// the far side saw, or "" if the connection failed (failure is an expected
// outcome in some tests, so it is only logged).
func (l *Lab) SourceSeen(t testing.TB, dst string) string {
	t.Helper()
	return l.sourceSeen(t, dst, "")
}

// SourceSeenFrom is SourceSeen for an application that chose its source
// address with bind(): the socket is bound to bindSrc before connecting.
func (l *Lab) SourceSeenFrom(t testing.TB, dst, bindSrc string) string {
	t.Helper()
	return l.sourceSeen(t, dst, bindSrc)
}

func (l *Lab) sourceSeen(t testing.TB, dst, bindSrc string) string {
	t.Helper()
	d := net.Dialer{Timeout: probeTimeout}
	if bindSrc != "" {
		ip, err := netip.ParseAddr(bindSrc)
		if err != nil {
			t.Fatalf("lab: bind address %q: %v", bindSrc, err)
		}
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 0))
	}
	seen, err := askProbe(l.Host, d, dst)
	if err != nil {
		t.Logf("lab: from %s (bind %q): %v", l.Host, bindSrc, err)
		return ""
	}
	return seen
}

// askProbe connects from namespace ns to dst:TCPPort with d and returns the
// source address the far side reported.
func askProbe(ns string, d net.Dialer, dst string) (string, error) {
	addr := net.JoinHostPort(dst, fmt.Sprint(TCPPort))
	var c net.Conn
	err := Do(ns, func() (err error) {
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(probeTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}

// UDPFlow is a connected UDP socket in H to dst:UDPPort. Because it keeps
// one 5-tuple, its conntrack entry (and so its NAT binding) lives as long
// as the flow, which lets tests check whether long-lived flows keep or
// move their source address when rules change.
type UDPFlow struct {
	c net.Conn
}

// UDPFlow opens a flow from H to dst:UDPPort; Close it when done (it is
// also closed at t's cleanup).
func (l *Lab) UDPFlow(t testing.TB, dst string) *UDPFlow {
	t.Helper()
	addr := net.JoinHostPort(dst, fmt.Sprint(UDPPort))
	var c net.Conn
	err := Do(l.Host, func() (err error) {
		c, err = net.Dial("udp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("lab: udp dial %s from %s: %v", addr, l.Host, err)
	}
	t.Cleanup(func() { c.Close() })
	return &UDPFlow{c: c}
}

// Ask sends one datagram and returns the source address the far side saw
// it come from, waiting at most 2s for the answer.
func (f *UDPFlow) Ask() (string, error) {
	if err := f.c.SetDeadline(time.Now().Add(probeTimeout)); err != nil {
		return "", err
	}
	if _, err := f.c.Write([]byte("?")); err != nil {
		return "", err
	}
	buf := make([]byte, 256)
	n, err := f.c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// Close closes the flow's socket.
func (f *UDPFlow) Close() error { return f.c.Close() }

// TCPFlow is a long-lived TCP connection from H to dst:TCPFlowPort. Each
// Ask sends a line on it and reads the source the far side saw: the
// connection's NAT binding, for as long as it works. A connection that
// broke (reset by the far side after its source changed) answers Ask with
// an error.
type TCPFlow struct {
	c net.Conn
	r *bufio.Reader
}

// TCPFlow connects from H to dst:TCPFlowPort; it is closed at t's cleanup.
func (l *Lab) TCPFlow(t testing.TB, dst string) *TCPFlow {
	t.Helper()
	addr := net.JoinHostPort(dst, fmt.Sprint(TCPFlowPort))
	var c net.Conn
	err := Do(l.Host, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, probeTimeout)
		return err
	})
	if err != nil {
		t.Fatalf("lab: tcp dial %s from %s: %v", addr, l.Host, err)
	}
	t.Cleanup(func() { c.Close() })
	return &TCPFlow{c: c, r: bufio.NewReader(c)}
}

// Ask sends one line and returns the source address the far side saw the
// connection come from, waiting at most 2s for the answer.
func (f *TCPFlow) Ask() (string, error) {
	if err := f.c.SetDeadline(time.Now().Add(probeTimeout)); err != nil {
		return "", err
	}
	if _, err := f.c.Write([]byte("?\n")); err != nil {
		return "", err
	}
	line, err := f.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// Close closes the connection (FIN): its conntrack entry then ends.
func (f *TCPFlow) Close() error { return f.c.Close() }

package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"
)

// farServers are the HA lab's far side, in F, run by the test process:
//   - HAEchoPort: each line a client sends comes back with F's receive
//     time in nanoseconds appended, for the long-lived connections;
//   - HAUDPPort: each datagram comes back as it was;
//   - HANewPort: one line is answered, then the connection is closed, for
//     the stream of new connections.
type farServers struct {
	lns  []net.Listener
	udp  net.PacketConn
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]bool
}

func (h *HA) startFar(t testing.TB) {
	t.Helper()
	f := &farServers{open: map[net.Conn]bool{}}
	h.far = f
	err := Do(h.Far, func() error {
		for _, port := range []int{HAEchoPort, HANewPort} {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			f.lns = append(f.lns, ln)
		}
		pc, err := net.ListenPacket("udp4", fmt.Sprintf(":%d", HAUDPPort))
		f.udp = pc
		return err
	})
	t.Cleanup(f.close)
	if err != nil {
		t.Fatalf("lab: far side servers in %s: %v", h.Far, err)
	}
	f.wg.Go(func() { f.accept(f.lns[0], true) })
	f.wg.Go(func() { f.accept(f.lns[1], false) })
	f.wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := f.udp.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			f.udp.WriteTo(buf[:n], from)
		}
	})
}

func (f *farServers) accept(ln net.Listener, long bool) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.open[c] = true
		f.mu.Unlock()
		f.wg.Go(func() {
			defer func() {
				f.mu.Lock()
				delete(f.open, c)
				f.mu.Unlock()
				c.Close()
			}()
			r := bufio.NewReader(c)
			for {
				// A connection silent this long is dead: the test is over
				// or the failover lost it; either way, let it go.
				c.SetReadDeadline(time.Now().Add(60 * time.Second))
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				stamp := strconv.FormatInt(time.Now().UnixNano(), 10)
				c.SetWriteDeadline(time.Now().Add(10 * time.Second))
				if _, err := c.Write([]byte(line[:len(line)-1] + " " + stamp + "\n")); err != nil || !long {
					return
				}
			}
		})
	}
}

func (f *farServers) close() {
	for _, ln := range f.lns {
		ln.Close()
	}
	if f.udp != nil {
		f.udp.Close()
	}
	f.mu.Lock()
	for c := range f.open {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// LoadOptions shape the clients' traffic. Zero values take the defaults.
type LoadOptions struct {
	// Conns long-lived TCP connections (default 50) each send a line every
	// Every (default 100ms) and read its echo.
	Conns int
	Every time.Duration
	// UDPEvery is how often the UDP flow sends a datagram (default 20ms).
	UDPEvery time.Duration
	// NewEvery is how often a new TCP connection is made (default 50ms);
	// each sends one line, reads the answer and closes.
	NewEvery time.Duration
}

// Load is the clients' traffic through the pair, from the clients'
// namespace to F, spread over the clients' addresses.
type Load struct {
	h     *HA
	opts  LoadOptions
	conns []*longConn
	udp   *longConn // one connected UDP socket, counted like a connection
	stop  chan struct{}
	wg    sync.WaitGroup
	// stopAt is when Stop was called: the final snapshot is as of then,
	// not of when the last new connection gave up.
	stopAt time.Time

	mu   sync.Mutex
	news []NewConn
}

type longConn struct {
	c  net.Conn
	mu sync.Mutex
	ConnStats
}

// ConnStats is what one long-lived connection (or the UDP flow) went
// through, as the client saw it.
type ConnStats struct {
	Local        netip.AddrPort
	Sent, Echoed int
	LastEcho     time.Time
	// Err is the first error of a read or a write (a reset, a timeout),
	// at ErrAt; nil while the connection is fine.
	Err   error
	ErrAt time.Time
}

// NewConn is one connection of the stream of new connections.
type NewConn struct {
	Start, End time.Time
	Local      netip.AddrPort
	Err        error
}

// LoadStats is a snapshot of the load, taken At.
type LoadStats struct {
	At    time.Time
	Conns []ConnStats
	UDP   ConnStats
	New   []NewConn
}

// StartLoad opens the long-lived connections and the UDP flow and starts
// all three kinds of traffic. It fails t if a connection cannot be opened.
// Stop it with Stop (t's cleanup does too).
func (h *HA) StartLoad(t testing.TB, opts LoadOptions) *Load {
	t.Helper()
	if opts.Conns == 0 {
		opts.Conns = 50
	}
	if opts.Every == 0 {
		opts.Every = 100 * time.Millisecond
	}
	if opts.UDPEvery == 0 {
		opts.UDPEvery = 20 * time.Millisecond
	}
	if opts.NewEvery == 0 {
		opts.NewEvery = 50 * time.Millisecond
	}
	l := &Load{h: h, opts: opts, stop: make(chan struct{})}
	t.Cleanup(func() { l.Stop() })
	for i := range opts.Conns {
		c, err := h.dial("tcp4", h.ClientAddrs[i%len(h.ClientAddrs)], netip.AddrPortFrom(HAFar, HAEchoPort), 5*time.Second)
		if err != nil {
			t.Fatalf("lab: long-lived connection %d of %d: %v", i+1, opts.Conns, err)
		}
		l.conns = append(l.conns, &longConn{c: c, ConnStats: ConnStats{Local: addrPort(c.LocalAddr())}})
	}
	u, err := h.dial("udp4", h.ClientAddrs[0], netip.AddrPortFrom(HAFar, HAUDPPort), 0)
	if err != nil {
		t.Fatalf("lab: UDP flow: %v", err)
	}
	l.udp = &longConn{c: u, ConnStats: ConnStats{Local: addrPort(u.LocalAddr())}}
	for _, c := range l.conns {
		l.wg.Go(func() { l.send(c, opts.Every, true) })
		l.wg.Go(func() { l.receive(c) })
	}
	l.wg.Go(func() { l.send(l.udp, opts.UDPEvery, false) })
	l.wg.Go(func() { l.receive(l.udp) })
	l.wg.Go(l.newConns)
	return l
}

// dial connects from the clients' namespace, from src, to dst.
func (h *HA) dial(network string, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	if network == "udp4" {
		d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	} else {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	var c net.Conn
	err := Do(h.Clients, func() (err error) {
		c, err = d.Dial(network, dst.String())
		return err
	})
	return c, err
}

func addrPort(a net.Addr) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func (l *Load) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (c *longConn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.Err == nil {
		c.Err, c.ErrAt = err, time.Now()
	}
}

// send writes a numbered line every interval until Stop. A TCP write only
// fails when the connection is reset or its buffer stays full.
func (l *Load) send(c *longConn, every time.Duration, tcp bool) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		select {
		case <-l.stop:
			return
		case <-tick.C:
		}
		c.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c.c, "%d\n", seq); err != nil {
			if !l.stopped() && tcp {
				c.fail(fmt.Errorf("write: %w", err))
				return
			}
			continue // UDP: an ICMP error fails one write, not the flow
		}
		c.mu.Lock()
		c.Sent++
		c.mu.Unlock()
	}
}

// receive counts echoes until Stop or an error.
func (l *Load) receive(c *longConn) {
	buf := make([]byte, 256)
	var r *bufio.Reader
	if _, ok := c.c.(*net.TCPConn); ok {
		r = bufio.NewReader(c.c)
	}
	for !l.stopped() {
		c.c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		var err error
		if r != nil {
			_, err = r.ReadString('\n')
		} else {
			_, err = c.c.Read(buf)
		}
		var ne net.Error
		switch {
		case err == nil:
			c.mu.Lock()
			c.Echoed++
			c.LastEcho = time.Now()
			c.mu.Unlock()
		case errors.As(err, &ne) && ne.Timeout():
			// quiet for a moment: a failover, or nothing sent yet
		case r == nil:
			// UDP: ECONNREFUSED from an ICMP error; the flow goes on
			time.Sleep(10 * time.Millisecond)
		default:
			if !l.stopped() {
				c.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
	}
}

// newConns makes a new connection every NewEvery, at most 64 at a time
// (while the pair fails over, each waits for its SYN to be answered).
func (l *Load) newConns() {
	tick := time.NewTicker(l.opts.NewEvery)
	defer tick.Stop()
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	defer wg.Wait()
	for i := 0; ; i++ {
		select {
		case <-l.stop:
			return
		case <-tick.C:
		}
		select {
		case sem <- struct{}{}:
		default:
			continue
		}
		src := l.h.ClientAddrs[i%len(l.h.ClientAddrs)]
		wg.Go(func() {
			defer func() { <-sem }()
			nc := NewConn{Start: time.Now()}
			nc.Err = func() error {
				c, err := l.h.dial("tcp4", src, netip.AddrPortFrom(HAFar, HANewPort), 10*time.Second)
				if err != nil {
					return err
				}
				defer c.Close()
				nc.Local = addrPort(c.LocalAddr())
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := c.Write([]byte("new\n")); err != nil {
					return err
				}
				_, err = bufio.NewReader(c).ReadString('\n')
				return err
			}()
			nc.End = time.Now()
			l.mu.Lock()
			l.news = append(l.news, nc)
			l.mu.Unlock()
		})
	}
}

// Stats returns a snapshot.
func (l *Load) Stats() LoadStats {
	s := LoadStats{At: time.Now()}
	for _, c := range l.conns {
		c.mu.Lock()
		s.Conns = append(s.Conns, c.ConnStats)
		c.mu.Unlock()
	}
	l.udp.mu.Lock()
	s.UDP = l.udp.ConnStats
	l.udp.mu.Unlock()
	l.mu.Lock()
	s.New = append(s.New, l.news...)
	l.mu.Unlock()
	return s
}

// WaitFlowing waits until every long-lived connection that has not
// failed, and the UDP flow, had an echo after since, and returns when that
// was; it gives up after limit and returns the zero time.
func (l *Load) WaitFlowing(since time.Time, limit time.Duration) time.Time {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		s := l.Stats()
		ok := s.UDP.LastEcho.After(since)
		for _, c := range s.Conns {
			ok = ok && (c.Err != nil || c.LastEcho.After(since))
		}
		if ok {
			return time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Time{}
}

// Stop ends the load, closes every connection and returns the final
// snapshot. Calling it again returns the same snapshot.
func (l *Load) Stop() LoadStats {
	if !l.stopped() {
		l.stopAt = time.Now()
		close(l.stop)
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		done := make(chan struct{})
		go func() { l.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
		}
		for _, c := range l.conns {
			c.c.Close()
		}
		l.udp.c.Close()
	}
	s := l.Stats()
	s.At = l.stopAt
	return s
}

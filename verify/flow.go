// Package verify starts a real flow and compares the source conntrack says
// it left with against the source egress-snat's rules promise for it. It
// owns what that takes: the promise of the rules for a packet (Judge, which
// explain prints too), the addresses a check may send to (SafeTarget: a
// rule's own address, a documentation address or one the operator named,
// nothing else), the flows themselves (as the host, a user, a cgroup, or
// forwarded from a throwaway namespace) and the likely cause of a flow that
// left with another source. The verify command and watch's verify canary
// both check through a Verifier.
//
// Rules say what should happen; the first NAT binding on the hook decides
// what does. Reading the conntrack entry of a real flow is the one check
// that cannot be fooled by a foreign nat chain, a rule ahead of our jump or
// a backend we do not read.
package verify

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/conntrack"
)

// Starter starts one flow to dst and returns its original tuple (the
// source before NAT). done releases the flow's socket; the conntrack entry
// outlives it.
type Starter interface {
	Start(proto uint8, dst netip.AddrPort) (orig conntrack.Tuple, done func(), err error)
}

// Local starts flows from this process, as the host's own traffic. With
// UID set, the socket is created with that file-system uid, which is what
// the owner match (iptables -m owner --uid-owner, nft meta skuid) reads.
type Local struct {
	UID *uint32
}

// Start opens a socket and sends the flow's first packet: one UDP
// datagram, or a TCP SYN (a non-blocking connect that is not waited for).
// Either creates the conntrack entry; nothing needs to answer.
func (l Local) Start(proto uint8, dst netip.AddrPort) (conntrack.Tuple, func(), error) {
	fd, err := l.socket(proto, dst.Addr())
	if err != nil {
		return conntrack.Tuple{}, nil, err
	}
	orig, err := SendFirst(fd, proto, dst)
	if err != nil {
		unix.Close(fd)
		return conntrack.Tuple{}, nil, err
	}
	return orig, func() { unix.Close(fd) }, nil
}

func (l Local) socket(proto uint8, dst netip.Addr) (int, error) {
	domain, typ := unix.AF_INET, unix.SOCK_DGRAM
	if dst.Is6() {
		domain = unix.AF_INET6
	}
	if proto == conntrack.TCP {
		typ = unix.SOCK_STREAM
	}
	if l.UID == nil {
		return unix.Socket(domain, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, int(proto))
	}
	// The socket's owner is the fsuid of the thread that creates it.
	// setfsuid(2) changes only this thread, which stays locked while it
	// differs, so no other goroutine ever runs with it. Staying on the
	// calling goroutine keeps the thread's network namespace.
	runtime.LockOSThread()
	unix.Setfsuid(int(*l.UID))
	fd, err := unix.Socket(domain, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, int(proto))
	unix.Setfsuid(0)
	if prev, _ := unix.SetfsuidRetUid(-1); prev == 0 {
		runtime.UnlockOSThread()
	} // else the thread stays locked, and Go destroys it with its goroutine
	return fd, err
}

// SendFirst connects fd to dst and sends the flow's first packet,
// returning the original tuple the kernel chose (natural source, an
// ephemeral port).
func SendFirst(fd int, proto uint8, dst netip.AddrPort) (conntrack.Tuple, error) {
	var sa unix.Sockaddr
	if dst.Addr().Is4() {
		sa = &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	} else {
		sa = &unix.SockaddrInet6{Addr: dst.Addr().As16(), Port: int(dst.Port())}
	}
	err := unix.Connect(fd, sa)
	switch {
	case proto == conntrack.TCP && errors.Is(err, unix.EINPROGRESS):
	case err != nil:
		return conntrack.Tuple{}, fmt.Errorf("connecting to %s: %w", dst, err)
	}
	local, err := unix.Getsockname(fd)
	if err != nil {
		return conntrack.Tuple{}, err
	}
	src := addrPort(local)
	if proto == conntrack.UDP {
		if _, err := unix.Write(fd, []byte("egress-snat verify\n")); err != nil {
			return conntrack.Tuple{}, fmt.Errorf("sending to %s: %w", dst, err)
		}
	}
	return conntrack.Tuple{Proto: proto, Src: src, Dst: dst}, nil
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// Child starts the flow in a child process (for a cgroup, which only a
// whole process can be moved into): Cmd must run ServeChild, for example a
// hidden mode of this very binary, with the flow's protocol and
// destination on its command line.
type Child struct {
	Cmd func(proto uint8, dst netip.AddrPort) (*exec.Cmd, error)
}

// childTimeout bounds how long the child may take to report its flow.
const childTimeout = 5 * time.Second

// Start runs the child and reads the original tuple it reports; done
// closes its stdin, which ends it.
func (c Child) Start(proto uint8, dst netip.AddrPort) (conntrack.Tuple, func(), error) {
	cmd, err := c.Cmd(proto, dst)
	if err != nil {
		return conntrack.Tuple{}, nil, err
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return conntrack.Tuple{}, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return conntrack.Tuple{}, nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return conntrack.Tuple{}, nil, fmt.Errorf("starting the flow's process: %w", err)
	}
	done := func() { stdin.Close(); cmd.Wait() }
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		orig, err := parseTuple(strings.TrimSpace(s))
		if err != nil {
			done()
			return conntrack.Tuple{}, nil, fmt.Errorf("the flow's process: %s", firstNonEmpty(strings.TrimSpace(stderr.String()), err.Error()))
		}
		return orig, done, nil
	case <-time.After(childTimeout):
		cmd.Process.Kill()
		done()
		return conntrack.Tuple{}, nil, fmt.Errorf("the flow's process did not report within %s", childTimeout)
	}
}

// ServeChild is the child's side: start the flow with Local, report its
// tuple on out, and hold the socket until in ends.
func ServeChild(l Local, proto uint8, dst netip.AddrPort, in io.Reader, out io.Writer) error {
	orig, done, err := l.Start(proto, dst)
	if err != nil {
		return err
	}
	defer done()
	fmt.Fprintf(out, "%d %s %s\n", orig.Proto, orig.Src, orig.Dst)
	io.Copy(io.Discard, in)
	return nil
}

func parseTuple(s string) (conntrack.Tuple, error) {
	var proto uint8
	var src, dst string
	if _, err := fmt.Sscanf(s, "%d %s %s", &proto, &src, &dst); err != nil {
		return conntrack.Tuple{}, fmt.Errorf("bad flow report %q", s)
	}
	a, err1 := netip.ParseAddrPort(src)
	b, err2 := netip.ParseAddrPort(dst)
	if err := errors.Join(err1, err2); err != nil {
		return conntrack.Tuple{}, fmt.Errorf("bad flow report %q: %w", s, err)
	}
	return conntrack.Tuple{Proto: proto, Src: a, Dst: b}, nil
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

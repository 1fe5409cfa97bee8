// Command probe is the far side of the lab in scripts/lab.sh: it shows which
// source address a connection really arrived from, after any SNAT on the way.
//
// Server (run in the gateway namespace):
//
//	probe -listen-port 7000
//
// answers every TCP connection, IPv4 and IPv6, with the peer's address and a
// newline, then closes it. IPv6 listens with IPV6_V6ONLY (Go does so for
// "tcp6"), so an IPv4 peer is never reported as a v4-mapped address.
//
// Client (run in the host namespace):
//
//	probe -dial 198.51.100.4:7000
//	probe -dial [2001:db8:ffff::4]:7000
//
// prints what the server said, that is the source address the far side saw.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	port := flag.Int("listen-port", 0, "serve on this TCP `port` (IPv4 and IPv6)")
	dial := flag.String("dial", "", "connect to `ADDR:PORT` and print what the server answers")
	timeout := flag.Duration("timeout", 2*time.Second, "client: give up after this long")
	flag.Parse()

	var err error
	switch {
	case *dial != "" && *port == 0:
		err = client(*dial, *timeout)
	case *port > 0 && *dial == "":
		err = serve(*port)
	default:
		fmt.Fprintln(os.Stderr, "usage: probe -listen-port PORT | probe -dial ADDR:PORT [-timeout D]")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func serve(port int) error {
	p := strconv.Itoa(port)
	var lns []net.Listener
	for _, l := range []struct{ network, addr string }{
		{"tcp4", "0.0.0.0:" + p},
		{"tcp6", "[::]:" + p},
	} {
		ln, err := net.Listen(l.network, l.addr)
		if err != nil {
			return fmt.Errorf("listening on %s %s: %w", l.network, l.addr, err)
		}
		lns = append(lns, ln)
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- accept(ln) }()
	}
	return <-errc
}

func accept(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			c.SetWriteDeadline(time.Now().Add(2 * time.Second))
			fmt.Fprintf(c, "%s\n", peer)
		}()
	}
}

func client(addr string, timeout time.Duration) error {
	if _, err := netip.ParseAddrPort(addr); err != nil {
		return fmt.Errorf("-dial %q: want ADDR:PORT, such as 198.51.100.4:7000 or [2001:db8:ffff::4]:7000", addr)
	}
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading from %s: %w", addr, err)
	}
	fmt.Println(strings.TrimSpace(line))
	return nil
}

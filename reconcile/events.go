package reconcile

import (
	"fmt"

	"github.com/vishvananda/netlink"
)

// netlinkEvents turns netlink address, link and route changes into calls
// of changed, until done is closed.
func (d *Daemon) netlinkEvents(done <-chan struct{}, changed func(string)) error {
	onErr := func(err error) {
		select {
		case <-done: // shutting down: the sockets were closed on purpose
		default:
			d.log.Warn("netlink subscription error", "err", err)
		}
	}
	addrs := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to address changes: %w", err)
	}
	links := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to link changes: %w", err)
	}
	routes := make(chan netlink.RouteUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to route changes: %w", err)
	}
	go func() {
		for {
			select {
			case u, ok := <-addrs:
				if !ok {
					return
				}
				verb := "removed"
				if u.NewAddr {
					verb = "added"
				}
				changed(fmt.Sprintf("address %s %s", u.LinkAddress.IP, verb))
			case _, ok := <-links:
				if !ok {
					return
				}
				changed("link change")
			case _, ok := <-routes:
				if !ok {
					return
				}
				changed("route change")
			}
		}
	}()
	return nil
}

package ha

import (
	"bytes"
	"embed"
	"fmt"
	"net/netip"
	"strconv"
	"text/template"
	"time"
)

//go:embed templates/*.tmpl
var templateFS embed.FS

var templates = template.Must(template.New("").Funcs(template.FuncMap{
	"seconds": func(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) },
	"fam": func(a netip.Addr) string {
		if a.Is4() {
			return "IPv4"
		}
		return "IPv6"
	},
	// prefix writes a single address without its /32 or /128.
	"prefix": func(p netip.Prefix) string {
		if p.IsSingleIP() {
			return p.Addr().String()
		}
		return p.String()
	},
}).ParseFS(templateFS, "templates/*.tmpl"))

// Instance names, the same on both nodes. The hook's log and keepalived's
// own name them; nothing else depends on them.
const (
	GroupName      = "egress_gateway"
	ClientInstance = "clients"
	EgressInstance = "egress"
	// DrainTrack is the name of the track_file that drains the node.
	DrainTrack = "drain"
)

// view is what the templates see: the configuration with defaults, plus
// what is derived from it once here rather than in template logic.
type view struct {
	Config
	Instances []instance
	// NoSync is the whole Address Ignore list of conntrackd.conf.
	NoSync []netip.Prefix
}

type instance struct {
	Name      string
	Interface string // where its adverts go
	RouterID  int
	Track     []string // further interfaces whose loss moves the group
	VIPs      []vip
}

type vip struct {
	Prefix netip.Prefix
	Dev    string
}

func newView(c Config) (view, error) {
	if err := c.Validate(); err != nil {
		return view{}, err
	}
	c = c.withDefaults()
	v := view{Config: c}
	for _, in := range []struct {
		name, dev string
		id        int
		vips      []netip.Prefix
	}{
		{ClientInstance, c.ClientInterface, c.ClientRouterID, []netip.Prefix{c.ClientVIP}},
		{EgressInstance, c.EgressInterface, c.EgressRouterID, c.EgressVIPs},
	} {
		i := instance{Name: in.name, Interface: in.dev, RouterID: in.id}
		if c.VRRPInterface != "" && c.VRRPInterface != in.dev {
			i.Interface = c.VRRPInterface
			i.Track = []string{in.dev}
		}
		for _, p := range in.vips {
			i.VIPs = append(i.VIPs, vip{Prefix: p, Dev: in.dev})
		}
		v.Instances = append(v.Instances, i)
	}
	single := func(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }
	v.NoSync = []netip.Prefix{
		single(netip.MustParseAddr("127.0.0.1")),
		single(netip.IPv6Loopback()),
		single(c.ClientVIP.Addr()),
	}
	for _, p := range c.EgressVIPs {
		v.NoSync = append(v.NoSync, single(p.Addr()))
	}
	v.NoSync = append(v.NoSync, single(c.Node.SyncAddr), single(c.Peer.SyncAddr))
	v.NoSync = append(v.NoSync, c.NoSync...)
	return v, nil
}

func render(name string, c Config) (string, error) {
	v, err := newView(c)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	if err := templates.ExecuteTemplate(&b, name, v); err != nil {
		return "", fmt.Errorf("rendering %s of %s: %w", name, c.Node.Name, err)
	}
	return b.String(), nil
}

// Keepalived returns the node's keepalived.conf: VRRPv3 with c's advert
// interval, both instances in one sync group whose notify is the hook,
// the drain track file, and gratuitous ARP settings for a fast move. The
// error is Validate's.
func Keepalived(c Config) (string, error) { return render("keepalived.conf.tmpl", c) }

// Conntrackd returns the node's conntrackd.conf: FTFW over UDP on the sync
// link with an external cache, its own lock file and control socket, TCP
// window tracking off, replicating TCP, UDP and ICMP connections but none
// that end on the nodes themselves. The error is Validate's.
func Conntrackd(c Config) (string, error) { return render("conntrackd.conf.tmpl", c) }

// Hook returns the node's notify hook, a POSIX shell script for the sync
// group's notify: on MASTER it commits the external cache, flushes the
// caches, resyncs from the kernel and sends a bulk update, in that order,
// then tells egress-snat to reconcile; on BACKUP and FAULT it shortens the
// kernel's timers and asks the peer for a resync, then tells egress-snat.
// The error is Validate's.
func Hook(c Config) (string, error) { return render("notify.sh.tmpl", c) }

// File is one rendered file and where it goes on the node.
type File struct {
	Path    string
	Mode    uint32 // permission bits
	Content string
}

// Files renders every file of the node: keepalived.conf, conntrackd.conf,
// the hook and the sysctl.d fragment (SysctlPath).
func Files(c Config) ([]File, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	d := c.withDefaults()
	var out []File
	for _, f := range []struct {
		path string
		mode uint32
		fn   func(Config) (string, error)
	}{
		{d.Paths.Keepalived, 0o644, Keepalived},
		{d.Paths.ConntrackdConf, 0o644, Conntrackd},
		{d.Paths.Hook, 0o755, Hook},
	} {
		s, err := f.fn(c)
		if err != nil {
			return nil, err
		}
		out = append(out, File{Path: f.path, Mode: f.mode, Content: s})
	}
	out = append(out, File{Path: SysctlPath, Mode: 0o644, Content: SysctlConf()})
	return out, nil
}

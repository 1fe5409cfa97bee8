package snat

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestWeigh(t *testing.T) {
	a, b, c := netip.MustParseAddr("192.0.2.22"), netip.MustParseAddr("192.0.2.23"), netip.MustParseAddr("192.0.2.24")
	tests := []struct {
		name    string
		addrs   []netip.Addr
		weights []int
		want    []netip.Addr
	}{
		{"3 to 1, interleaved", []netip.Addr{a, b}, []int{3, 1}, []netip.Addr{a, a, b, a}},
		{"reduced by the common divisor", []netip.Addr{a, b}, []int{30, 10}, []netip.Addr{a, a, b, a}},
		{"equal weights: the list as it is", []netip.Addr{a, b, c}, []int{5, 5, 5}, []netip.Addr{a, b, c}},
		{"2:1:1", []netip.Addr{a, b, c}, []int{2, 1, 1}, []netip.Addr{a, b, c, a}},
		{"one address", []netip.Addr{a}, []int{7}, []netip.Addr{a}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Weigh(tt.addrs, tt.weights)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got, cmp.Comparer(func(x, y netip.Addr) bool { return x == y })); diff != "" {
				t.Errorf("Weigh(%v, %v) (-want +got):\n%s", tt.addrs, tt.weights, diff)
			}
			// Every address gets exactly its reduced weight, and the
			// collapse gives the weights back in that reduced form.
			addrs, weights, _ := Weights(got)
			if !slices.Equal(addrs, tt.addrs) {
				t.Errorf("Weights gave addresses %v, want %v", addrs, tt.addrs)
			}
			g := 0
			for _, w := range tt.weights {
				g = gcd(g, w)
			}
			for i, w := range weights {
				if w != tt.weights[i]/g {
					t.Errorf("%s has %d turns, want %d", addrs[i], w, tt.weights[i]/g)
				}
			}
		})
	}
}

// TestWeighSmooth: no run of one address is longer than its share needs,
// so a short window of connections is near the ratio too.
func TestWeighSmooth(t *testing.T) {
	a, b := netip.MustParseAddr("192.0.2.22"), netip.MustParseAddr("192.0.2.23")
	got, err := Weigh([]netip.Addr{a, b}, []int{1, 1})
	if err != nil || !slices.Equal(got, []netip.Addr{a, b}) {
		t.Fatalf("1:1: %v %v", got, err)
	}
	got, err = Weigh([]netip.Addr{a, b}, []int{5, 3})
	if err != nil {
		t.Fatal(err)
	}
	run, longest := 0, 0
	for i := range got {
		if i > 0 && got[i] == got[i-1] {
			run++
		} else {
			run = 1
		}
		longest = max(longest, run)
	}
	if longest > 2 {
		t.Errorf("5:3 expanded to %v: a run of %d", got, longest)
	}
}

func TestWeighRefuses(t *testing.T) {
	a, b := netip.MustParseAddr("192.0.2.22"), netip.MustParseAddr("192.0.2.23")
	c := netip.MustParseAddr("192.0.2.24")
	if _, err := Weigh([]netip.Addr{a, b, c}, []int{100, 99, 98}); err == nil || !strings.Contains(err.Error(), "297 turns") {
		t.Errorf("100:99:98: %v, want the turns named", err)
	}
	if _, err := Weigh([]netip.Addr{a, b}, []int{1, 0}); err == nil {
		t.Error("a zero weight accepted")
	}
}

func TestParseSpread(t *testing.T) {
	to, weighted, err := ParseSpread([]string{"192.0.2.22=3", " 192.0.2.23 "})
	if err != nil || !weighted || (Entry{To: to}).ToString() != "192.0.2.22=3,192.0.2.23=1" {
		t.Errorf("ParseSpread: %v %v %v", to, weighted, err)
	}
	if to, weighted, err := ParseSpread([]string{"192.0.2.22", "192.0.2.23"}); err != nil || weighted || len(to) != 2 {
		t.Errorf("without weights: %v %v %v", to, weighted, err)
	}
	for _, tt := range []struct{ item, want string }{
		{"192.0.2.22=0", `"192.0.2.22=0": weight 0 is out of range`},
		{"192.0.2.22=-2", `"192.0.2.22=-2": weight -2 is out of range`},
		{"192.0.2.22=101", `weight 101 is out of range`},
		{"192.0.2.22=x", `"192.0.2.22=x": weight "x" is not a whole number`},
		{"192.0.2.22=1.5", `weight "1.5" is not a whole number`},
		{"192.0.2.22=", `weight "" is not a whole number`},
		{"=3", `"" is not an IP address`},
		{"192.0.2.300=3", `"192.0.2.300" is not an IP address`},
	} {
		if _, _, err := ParseSpread([]string{tt.item}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseSpread(%q): %v, want %q", tt.item, err, tt.want)
		}
	}
	if _, _, err := ParseSpread([]string{"192.0.2.22=2", "192.0.2.22=1"}); err == nil || !strings.Contains(err.Error(), "names 192.0.2.22 twice") {
		t.Errorf("an address twice: %v", err)
	}
}

// TestWeightedEntryJSON: a weighted entry's JSON names each address once,
// with its weight; an unweighted one has no weights.
func TestWeightedEntryJSON(t *testing.T) {
	to, _, err := ParseSpread([]string{"192.0.2.22=3", "192.0.2.23"})
	if err != nil {
		t.Fatal(err)
	}
	e := Entry{Match: Match{Dst: netip.MustParsePrefix("198.51.100.0/24"), Out: "eth0"}, Natural: netip.MustParseAddr("192.0.2.250"), To: to}
	b, err := e.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"to":["192.0.2.22","192.0.2.23"],"weights":[3,1]`) {
		t.Errorf("JSON %s, want to and weights", b)
	}
	e.To = []netip.Addr{to[0], to[2]}
	if b, _ := e.MarshalJSON(); strings.Contains(string(b), "weights") {
		t.Errorf("an unweighted entry's JSON %s names weights", b)
	}
}

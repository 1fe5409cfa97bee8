package snat

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func isInvalid(err error) bool {
	var inv *InvalidError
	return errors.As(err, &inv)
}

// TestParsePorts: a range or one port, 1 to 65535; errors name the value
// and are bad input.
func TestParsePorts(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Ports
		err  string
	}{
		{"", Ports{}, ""},
		{"40000-40099", Ports{40000, 40099}, ""},
		{" 40000 - 40099 ", Ports{40000, 40099}, ""},
		{"53", Ports{53, 53}, ""},
		{"1-65535", Ports{1, 65535}, ""},
		{"0-10", Ports{}, `"0-10"`},
		{"10-9", Ports{}, `"10-9"`},
		{"1-65536", Ports{}, `"1-65536"`},
		{"40000:40099", Ports{}, `"40000:40099"`},
		{"-1", Ports{}, `"-1"`},
	} {
		got, err := ParsePorts(tc.in)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("ParsePorts(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err) || !isInvalid(err)):
			t.Errorf("ParsePorts(%q) = %v, %v; want bad input naming %s", tc.in, got, err, tc.err)
		}
	}
	if s := (Ports{40000, 40007}).String(); s != "40000-40007" {
		t.Errorf("String() = %q", s)
	}
	if n := (Ports{40000, 40007}).Size(); n != 8 {
		t.Errorf("Size() = %d, want 8", n)
	}
}

// TestEntryPorts: a port range takes part in Equal, and shows in
// ToString and the JSON form.
func TestEntryPorts(t *testing.T) {
	e := entry("203.0.113.7/32", "192.0.2.250", "192.0.2.22")
	p := e
	p.Ports = Ports{40000, 40007}
	if e.Equal(p) {
		t.Error("entries differing only in their port range compare equal")
	}
	if s := p.ToString(); s != "192.0.2.22 ports 40000-40007" {
		t.Errorf("ToString() = %q", s)
	}
	b, err := json.Marshal(p)
	if err != nil || !strings.Contains(string(b), `"ports":"40000-40007"`) {
		t.Errorf("JSON %s, %v; want ports", b, err)
	}
	if b, _ := json.Marshal(e); strings.Contains(string(b), "ports") {
		t.Errorf("JSON %s of an entry without a range names ports", b)
	}
}

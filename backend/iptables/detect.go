package iptables

import (
	"bytes"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// Flavour names an implementation of iptables: iptables-nft, which writes
// nftables tables through the iptables interface, or iptables-legacy.
type Flavour string

const (
	FlavourNFT    Flavour = "nft"
	FlavourLegacy Flavour = "legacy"
)

// Other is the flavour that is not b.
func (b Flavour) Other() Flavour {
	if b == FlavourNFT {
		return FlavourLegacy
	}
	return FlavourNFT
}

// DetectFlavour returns the backend the host's `iptables` command uses, the
// one operators and other tools on the host see. "auto" detects; "nft" and
// "legacy" are taken as given.
func DetectFlavour(want string) (Flavour, error) {
	switch want {
	case "nft":
		return FlavourNFT, nil
	case "legacy":
		return FlavourLegacy, nil
	case "", "auto":
	default:
		return "", snat.Invalid("--iptables-backend %q: want auto, nft or legacy", want)
	}
	path, err := exec.LookPath("iptables")
	if err != nil {
		return "", fmt.Errorf("iptables not found in PATH (install the iptables package): %w", err)
	}
	// Debian, Ubuntu, Fedora and Alpine point iptables at
	// xtables-{nft,legacy}-multi; reading the link costs no process.
	if target, err := filepath.EvalSymlinks(path); err == nil {
		switch base := filepath.Base(target); {
		case strings.Contains(base, "nft"):
			return FlavourNFT, nil
		case strings.Contains(base, "legacy"):
			return FlavourLegacy, nil
		}
	}
	out, err := exec.Command(path, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version: %v: %s", path, err, bytes.TrimSpace(out))
	}
	if strings.Contains(string(out), "nf_tables") {
		return FlavourNFT, nil
	}
	return FlavourLegacy, nil
}

package ha

// The external tests (package ha_test, which may import internal/lab: lab
// imports ha) use the golden cases' inputs too.
var (
	LabA       = labA
	NopreemptB = nopreemptB
)

package main

import (
	"reflect"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/stats"
)

// TestStatsHelpNamesJSONFields: stats --help lists every field of its
// --json, so that a field added to the report is documented with it.
func TestStatsHelpNamesJSONFields(t *testing.T) {
	for _, v := range []any{stats.Address{}, stats.Destination{}, stats.Pool{}, stats.PoolAddress{}, stats.Tuple{}} {
		typ := reflect.TypeOf(v)
		for i := range typ.NumField() {
			name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
			if name != "" && name != "-" && !strings.Contains(statsCommand.Description, name) {
				t.Errorf("stats --help does not name %s's JSON field %q", typ.Name(), name)
			}
		}
	}
}

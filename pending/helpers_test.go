package pending

import (
	"strconv"
	"syscall"
)

func itoa(i int) string { return strconv.Itoa(i) }

// reap collects the test's own released child so it does not linger as a
// zombie (which /proc still lists with its command line gone).
func reap(pid int) {
	var ws syscall.WaitStatus
	syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
}

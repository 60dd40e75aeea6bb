// containerd's own snapshotter testsuite (snapshots/testsuite, containerd 1.6) against
// `laminae snapshotter serve`, dialled as containerd dials its proxy plugins; and, beside it,
// against containerd's own overlayfs snapshotter, as a control run on the same machine.
//
// Built in GOPATH mode from Debian's packages (golang-go,
// golang-github-containerd-containerd-dev): tests/containerd/run-suite does it. Each test case
// gets a fresh server on the suite's own root; the suite needs -test.root.
package suite

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	python = flag.String("python", "python3", "the Python with laminae[containerd] installed")
	driver = flag.String("driver", "overlay", "the laminae driver to serve")
)

func TestLaminae(t *testing.T) {
	testsuite.SnapshotterSuite(t, "laminae-"+*driver, newLaminae)
}

func TestControlOverlayfs(t *testing.T) {
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := overlay.NewSnapshotter(root)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// newLaminae starts a server whose store lives in root and dials it.
func newLaminae(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	// A unix socket's path must be short (108 bytes): not under the suite's deep root.
	sockets, err := os.MkdirTemp("/tmp", "laminae-suite-")
	if err != nil {
		return nil, nil, err
	}
	socket := filepath.Join(sockets, "snapshotter.sock")
	cmd := exec.Command(*python, "-m", "laminae.snapshotter", "serve", "--socket", socket,
		"--root", filepath.Join(root, "store"), "--runroot", filepath.Join(root, "run"),
		"--driver", *driver)
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		os.RemoveAll(sockets)
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		defer os.RemoveAll(sockets)
		_ = cmd.Process.Signal(syscall.SIGTERM)
		return <-exited
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		select {
		case err := <-exited:
			os.RemoveAll(sockets)
			return nil, nil, fmt.Errorf("laminae snapshotter serve exited (%v): %s", err, log.String())
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			os.RemoveAll(sockets)
			return nil, nil, fmt.Errorf("laminae snapshotter serve did not start: %s", log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.DialContext(ctx, dialer.DialAddress(socket), grpc.WithInsecure(),
		grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "laminae")
	return sn, func() error {
		conn.Close()
		if err := stop(); err != nil {
			return fmt.Errorf("laminae snapshotter serve: %v: %s", err, log.String())
		}
		return nil
	}, nil
}

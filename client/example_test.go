package client_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"github.com/lodge-vm/lodge/api"
	"github.com/lodge-vm/lodge/client"
)

// fakeDaemon answers like a daemon that creates VMs instantly.
func fakeDaemon() (socket string, stop func()) {
	dir, _ := os.MkdirTemp("", "lodge-example")
	socket = filepath.Join(dir, "lodge.sock")
	var lc net.ListenConfig
	ln, _ := lc.Listen(context.Background(), "unix", socket)
	mux := http.NewServeMux()
	done := api.Operation{ID: "op1", Kind: "create", Target: "web", State: api.OpSucceeded,
		Result: api.VM{Name: "web", State: api.StateStopped, CPUs: 1, Memory: 512 << 20}}
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		_ = json.NewEncoder(w).Encode(api.Operation{ID: "op1", Kind: "create", Target: "web", State: api.OpRunning})
	})
	mux.HandleFunc("GET /v1/operations/op1/wait", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(done)
	})
	mux.HandleFunc("GET /v1/vms/ghost", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(api.Error{Error: `vm "ghost": not found`, Code: "not_found"})
	})
	mux.HandleFunc("GET /v1/vms/web/export", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("a bundle's bytes"))
	})
	mux.HandleFunc("POST /v1/import", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(api.VM{Name: r.URL.Query().Get("name"), UUID: "0a1b2c3d-4e5f-4071-8899-aabbccddeeff"})
	})
	mux.HandleFunc("POST /v1/vms/web/bench", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		_ = json.NewEncoder(w).Encode(api.Operation{ID: "op2", Kind: "bench", Target: "web", State: api.OpRunning})
	})
	mux.HandleFunc("GET /v1/operations/op2/wait", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(api.Operation{ID: "op2", Kind: "bench", Target: "web", State: api.OpSucceeded,
			Result: api.BenchReport{VM: "web", Accel: "kvm", Rows: []api.BenchRow{
				{Test: "cpu.int.single", Unit: "Mops/s", Host: 310, Guest: 301, Percent: 97.1},
				{Test: "disk.rand_read_4k", Bus: "virtio", Unit: "IOPS", Host: 21000, Guest: 15960, Percent: 76},
			}}})
	})
	mux.HandleFunc("POST /v1/vms/web/disks", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		_ = json.NewEncoder(w).Encode(api.Operation{ID: "op3", Kind: "disk-add", Target: "web", State: api.OpRunning})
	})
	mux.HandleFunc("GET /v1/operations/op3/wait", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(api.Operation{ID: "op3", Kind: "disk-add", Target: "web", State: api.OpSucceeded,
			Result: api.VM{Name: "web", State: api.StateRunning, Disks: []api.Disk{
				{Name: "root", Bus: "virtio", Size: 8 << 30},
				{Name: "data1", Bus: "virtio", Size: 20 << 30},
			}}})
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()
	return socket, func() { _ = srv.Close(); _ = os.RemoveAll(dir) }
}

// Create a VM and wait for the operation to finish.
func Example() {
	socket, stop := fakeDaemon()
	defer stop()
	ctx := context.Background()
	c := client.New(socket)

	op, err := c.CreateVM(ctx, api.CreateVM{Name: "web", Image: "tiny", Memory: 512 << 20})
	if err != nil {
		fmt.Println(err)
		return
	}
	op, err = c.Wait(ctx, op, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	var vm api.VM
	if err := client.Result(op, &vm); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(vm.Name, vm.State, vm.Memory>>20, "MiB")

	_, err = c.GetVM(ctx, "ghost")
	fmt.Println(err, client.IsNotFound(err))
	// Output:
	// web stopped 512 MiB
	// vm "ghost": not found true
}

// A missing daemon is reported as ErrDaemonDown.
func ExampleClient_Host() {
	c := client.New("/nonexistent/lodge.sock")
	_, err := c.Host(context.Background())
	fmt.Println(err)
	// Output:
	// the lodge daemon is not running (no answer on /nonexistent/lodge.sock)
}

// Export a VM to a bundle and import it again under another name, with a
// new identity.
func ExampleClient_ExportVM() {
	socket, stop := fakeDaemon()
	defer stop()
	ctx := context.Background()
	c := client.New(socket)

	var bundle bytes.Buffer
	if err := c.ExportVM(ctx, "web", api.ExportOptions{Compression: "fast"}, &bundle); err != nil {
		fmt.Println(err)
		return
	}
	vm, err := c.ImportVM(ctx, &bundle, int64(bundle.Len()), api.ImportOptions{Name: "web-copy"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(vm.Name)
	// Output:
	// web-copy
}

// Benchmark a VM against its host and print the guest's share of each.
func ExampleClient_Bench() {
	socket, stop := fakeDaemon()
	defer stop()
	ctx := context.Background()
	c := client.New(socket)

	op, err := c.Bench(ctx, "web", api.BenchRequest{Repeats: 3, DiskBuses: []string{"virtio"}})
	if err == nil {
		op, err = c.Wait(ctx, op, nil)
	}
	var rep api.BenchReport
	if err == nil {
		err = client.Result(op, &rep)
	}
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, r := range rep.Rows {
		fmt.Printf("%s %s: %.0f%% of the host\n", r.Test, r.Bus, r.Percent)
	}
	// Output:
	// cpu.int.single : 97% of the host
	// disk.rand_read_4k virtio: 76% of the host
}

// Give a running VM a new data disk; it is hot-plugged, and the result is
// the VM with its disks.
func ExampleClient_AddDisk() {
	socket, stop := fakeDaemon()
	defer stop()
	ctx := context.Background()
	c := client.New(socket)

	op, err := c.AddDisk(ctx, "web", 20<<30)
	if err == nil {
		op, err = c.Wait(ctx, op, nil)
	}
	var v api.VM
	if err == nil {
		err = client.Result(op, &v)
	}
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, d := range v.Disks {
		fmt.Printf("%s %s %d GiB\n", d.Name, d.Bus, d.Size>>30)
	}
	// Output:
	// root virtio 8 GiB
	// data1 virtio 20 GiB
}

package daemon

import (
	"context"
	"net/http"
	"slices"

	"github.com/lodge-vm/lodge/api"
)

func (d *Daemon) networkRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/networks", d.listNetworks)
	mux.HandleFunc("POST /v1/networks", d.createNetwork)
	mux.HandleFunc("GET /v1/networks/{name}", d.getNetwork)
	mux.HandleFunc("DELETE /v1/networks/{name}", d.deleteNetwork)
}

func (d *Daemon) listNetworks(w http.ResponseWriter, r *http.Request) {
	out, err := d.networks.List(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) createNetwork(w http.ResponseWriter, r *http.Request) {
	var req api.CreateNetwork
	if !decode(w, r, &req) {
		return
	}
	n, err := d.networks.Create(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, n)
}

func (d *Daemon) getNetwork(w http.ResponseWriter, r *http.Request) {
	n, err := d.networks.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, n)
}

func (d *Daemon) deleteNetwork(w http.ResponseWriter, r *http.Request) {
	if err := d.removeNetwork(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// removeNetwork deletes a network no VM has a NIC on.
func (d *Daemon) removeNetwork(ctx context.Context, name string) error {
	users, err := d.networkUsers(ctx, name)
	if err != nil {
		return err
	}
	return d.networks.Delete(ctx, name, users)
}

// networkUsers are the VMs with a NIC on network name.
func (d *Daemon) networkUsers(ctx context.Context, name string) ([]string, error) {
	vms, err := d.vms.List(ctx)
	if err != nil {
		return nil, err
	}
	var users []string
	for _, v := range vms {
		if slices.ContainsFunc(v.NICs, func(n api.NIC) bool { return n.Network == name }) {
			users = append(users, v.Name)
		}
	}
	return users, nil
}

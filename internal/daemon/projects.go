package daemon

import (
	"net/http"

	"github.com/lodge-vm/lodge/api"
)

func (d *Daemon) listProjects(w http.ResponseWriter, r *http.Request) {
	ps, err := d.projects.List(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ps)
}

func (d *Daemon) createProject(w http.ResponseWriter, r *http.Request) {
	var req api.Project
	if !decode(w, r, &req) {
		return
	}
	p, err := d.projects.Create(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	d.log.Info("project created", "project", p.Name, "limits", p.Limits)
	writeJSON(w, http.StatusCreated, p)
}

func (d *Daemon) getProject(w http.ResponseWriter, r *http.Request) {
	p, err := d.projects.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (d *Daemon) setProject(w http.ResponseWriter, r *http.Request) {
	var req api.SetProject
	if !decode(w, r, &req) {
		return
	}
	p, err := d.projects.Set(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	d.log.Info("project limits set", "project", p.Name, "limits", p.Limits)
	writeJSON(w, http.StatusOK, p)
}

func (d *Daemon) deleteProject(w http.ResponseWriter, r *http.Request) {
	if err := d.projects.Delete(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

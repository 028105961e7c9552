package main

import (
	"errors"
	"reflect"
	"testing"

	"github.com/lodge-vm/lodge/api"
)

func TestParseSettings(t *testing.T) {
	tests := []struct {
		words   []string
		want    api.SetVM
		wantErr bool
	}{
		{[]string{"memory=512M"}, api.SetVM{Memory: 512 << 20}, false},
		{[]string{"memory=2GiB", "cpus=4", "max_memory=4G"}, api.SetVM{Memory: 2 << 30, CPUs: 4, MaxMemory: 4 << 30}, false},
		{[]string{"memory=lots"}, api.SetVM{}, true},
		{[]string{"memory="}, api.SetVM{}, true},
		{[]string{"memory"}, api.SetVM{}, true},
		{[]string{"cpus=0"}, api.SetVM{}, true},
		{[]string{"cpus=two"}, api.SetVM{}, true},
		{[]string{"colour=red"}, api.SetVM{}, true},
		{[]string{"min_memory=128M"}, api.SetVM{MinMemory: ptr(int64(128 << 20))}, false},
		{[]string{"min_memory=off"}, api.SetVM{MinMemory: ptr(int64(0))}, false},
		{[]string{"min_memory=0"}, api.SetVM{MinMemory: ptr(int64(0))}, false},
		{[]string{"min_memory=some"}, api.SetVM{}, true},
		{[]string{"networks=back,nat"}, api.SetVM{Networks: []string{"back", "nat"}}, false},
		{[]string{"networks=back,,nat"}, api.SetVM{}, true},
		{[]string{"networks=back,"}, api.SetVM{}, true},
	}
	for _, tt := range tests {
		got, err := parseSettings(tt.words)
		var ue usageError
		if tt.wantErr {
			if !errors.As(err, &ue) {
				t.Errorf("parseSettings(%q) = %v, want a usage error", tt.words, err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("parseSettings(%q) = %+v, %v; want %+v", tt.words, got, err, tt.want)
		}
	}
}

func ptr[T any](v T) *T { return &v }

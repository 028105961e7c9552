module github.com/lodge-vm/lodge

go 1.26.8

module tapwire-e2e/goserver

go 1.19

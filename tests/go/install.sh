#!/usr/bin/env bash
# Prepares the Go peer tests (tests/go): downloads the modules pinned by
# go.mod/go.sum into the module cache, builds the two code generators,
# protoc-gen-go and protoc-gen-go-grpc, at those pinned versions into
# .tools/go/bin, and compiles the libraries the tests import. Idempotent: a
# stamp of go.mod and go.sum skips everything while they are unchanged.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/.tools/go/bin"
stamp="$bin/.go-mod.sha256"

if ! command -v go >/dev/null; then
  echo "tests/go/install.sh: go is not installed (Go 1.26 or later is needed)" >&2
  exit 1
fi

cd "$here"
# Read-only: go.mod and go.sum are the pins; a build that wants to change
# them fails instead of resolving something newer.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
want=$(cat go.mod go.sum | sha256sum | cut -d' ' -f1)
if [ -x "$bin/protoc-gen-go" ] && [ -x "$bin/protoc-gen-go-grpc" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

echo "==> preparing the Go peer tests (go mod download, protoc-gen-go, protoc-gen-go-grpc)"
go mod download
go mod verify >/dev/null
mkdir -p "$bin"
go build -o "$bin/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
# Compiling the libraries the tests import now keeps the first test run quick.
go build google.golang.org/grpc google.golang.org/grpc/credentials/insecure \
  google.golang.org/genproto/googleapis/rpc/errdetails github.com/segmentio/kafka-go \
  google.golang.org/protobuf/encoding/protojson google.golang.org/protobuf/types/known/timestamppb
echo "$want" > "$stamp"

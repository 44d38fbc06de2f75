// Command kstatus prints the verdict of the kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus/status) on
// each Kubernetes object it reads: the same computation Flux's kustomize-controller and kstatus-based waiting
// tools apply to a resource after `apply`. The tests feed it FineTuneJobs in every state the operator reports.
//
// usage: kstatus [FILE...]   YAML or JSON objects (several per file, `---`-separated); none or `-` is stdin.
// Prints one JSON line per object: {"name": ..., "status": "InProgress|Current|Failed|...", "message": ...}.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func judge(path string, in io.Reader, out *json.Encoder) error {
	decoder := yaml.NewYAMLOrJSONDecoder(bufio.NewReader(in), 4096)
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("%s: %w", path, err)
		}
		if len(raw) == 0 || string(raw) == "null" {
			continue
		}
		// Decoded as client-go decodes objects from the API server (whole numbers as int64), which is
		// what kstatus expects of metadata.generation and status.observedGeneration.
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		result, err := status.Compute(u)
		if err != nil {
			return fmt.Errorf("%s: %s: %w", path, u.GetName(), err)
		}
		if err := out.Encode(verdict{u.GetName(), string(result.Status), result.Message}); err != nil {
			return err
		}
	}
}

func main() {
	paths := os.Args[1:]
	if len(paths) == 0 {
		paths = []string{"-"}
	}
	out := json.NewEncoder(os.Stdout)
	for _, path := range paths {
		if path == "-h" || path == "--help" {
			fmt.Fprintln(os.Stderr, "usage: kstatus [FILE...]  (YAML or JSON objects; prints one JSON verdict per object)")
			os.Exit(2)
		}
		in := io.Reader(os.Stdin)
		if path != "-" {
			file, err := os.Open(path)
			if err != nil {
				fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
				os.Exit(1)
			}
			defer file.Close()
			in = file
		}
		if err := judge(path, in, out); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
			os.Exit(1)
		}
	}
}

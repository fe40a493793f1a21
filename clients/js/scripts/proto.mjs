// Generates src/gen/cim_pb.ts from cim/protocols/cim.proto with buf and protoc-gen-es
// (both pinned in package.json), or, with --check, generates into a temporary
// directory and fails if the committed file differs: the same staleness check the
// Python side has for cim_pb2.py, so the two languages never speak different protos.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const protoDir = resolve(root, "../../cim/protocols");
const bin = join(root, "node_modules", ".bin");
const committed = join(root, "src", "gen", "cim_pb.ts");

function generate(outDir) {
  const template = {
    version: "v2",
    plugins: [
      {
        local: join(bin, "protoc-gen-es"),
        out: outDir,
        opt: ["target=ts", "import_extension=js"],
      },
    ],
  };
  execFileSync(
    join(bin, "buf"),
    ["generate", protoDir, "--path", join(protoDir, "cim.proto"), "--template", JSON.stringify(template)],
    { stdio: "inherit" },
  );
  return join(outDir, "cim_pb.ts");
}

if (process.argv.includes("--check")) {
  const scratch = mkdtempSync(join(tmpdir(), "cim-proto-"));
  try {
    const fresh = readFileSync(generate(scratch), "utf8");
    if (fresh !== readFileSync(committed, "utf8")) {
      console.error("src/gen/cim_pb.ts is stale: run `npm run proto` after changing cim.proto");
      process.exit(1);
    }
    console.log("src/gen/cim_pb.ts matches cim/protocols/cim.proto");
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
} else {
  generate(resolve(root, process.argv[2] ?? "src/gen"));
  console.log(`generated ${committed}`);
}

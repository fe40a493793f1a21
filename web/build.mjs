// Builds the web app with esbuild: src/main.ts and src/app.css into assets/ with
// content-hashed names (the daemon serves assets/* as immutable) and index.html naming
// them (served no-cache). Default output: ../cim/webapp/static, where [web] looks.
//
//   node build.mjs [--out DIR]   the app
//   node build.mjs --tests       test/*.test.ts into build/test/ for node --test
import * as esbuild from "esbuild";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const option = (name, fallback) => {
  const at = args.indexOf(name);
  return at >= 0 && args[at + 1] ? args[at + 1] : fallback;
};

// The SDK's sources (../clients/js/src) import its dependencies by name: they resolve
// from this package's node_modules, installed from web/package-lock.json.
const common = {
  bundle: true,
  format: "esm",
  target: "es2022",
  nodePaths: [join(here, "node_modules")],
  logLevel: "warning",
  legalComments: "none",
};

async function buildApp(out) {
  mkdirSync(out, { recursive: true });
  rmSync(join(out, "assets"), { recursive: true, force: true });
  rmSync(join(out, "index.html"), { force: true });
  const result = await esbuild.build({
    ...common,
    entryPoints: { app: join(here, "src/main.ts"), style: join(here, "src/app.css") },
    outdir: join(out, "assets"),
    entryNames: "[name]-[hash]",
    platform: "browser",
    minify: true,
    sourcemap: "linked",
    metafile: true,
    // Node's WebSocket fallback in the SDK: browsers have their own.
    external: ["ws"],
  });
  const outputs = Object.keys(result.metafile.outputs).map((path) => relative(out, resolve(path)));
  const js = outputs.find((path) => /^assets\/app-[^/]+\.js$/.test(path));
  const css = outputs.find((path) => /^assets\/style-[^/]+\.css$/.test(path));
  if (!js || !css) throw new Error(`esbuild did not write the app and its style: ${outputs.join(", ")}`);
  const page = readFileSync(join(here, "src/index.html"), "utf8").replace("%JS%", `/${js}`).replace("%CSS%", `/${css}`);
  writeFileSync(join(out, "index.html"), page);
  // Leftovers of style's empty JS entry, if any.
  for (const name of readdirSync(join(out, "assets"))) {
    if (/^style-.*\.js(\.map)?$/.test(name)) rmSync(join(out, "assets", name));
  }
  console.log(`web app: ${out} (${js}, ${css})`);
}

async function buildTests() {
  const dir = join(here, "test");
  const out = join(here, "build/test");
  rmSync(out, { recursive: true, force: true });
  const entryPoints = readdirSync(dir)
    .filter((name) => name.endsWith(".test.ts"))
    .map((name) => join(dir, name));
  await esbuild.build({ ...common, entryPoints, outdir: out, outExtension: { ".js": ".mjs" }, platform: "node", external: ["ws"] });
}

if (args.includes("--tests")) await buildTests();
else await buildApp(resolve(option("--out", join(here, "../cim/webapp/static"))));

// Copies the browser client from the Python package, its one source of truth
// (fastws/static/fastws.js and fastws.d.ts, served by every fastws server at
// /fastws.js), next to this package.json. Run by `npm pack` / `npm publish`
// (prepack) and by `npm run check-types`. Also checks that this package's version
// is the Python package's (fastws/_version.py), so both are released together.
import { copyFileSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const src = join(root, "fastws", "static");

const pyVersion = /__version__\s*=\s*"([^"]+)"/.exec(
  readFileSync(join(root, "fastws", "_version.py"), "utf8"))?.[1];
const pkg = JSON.parse(readFileSync(join(here, "package.json"), "utf8"));
if (pkg.version !== pyVersion) {
  console.error(`package.json version ${pkg.version} != fastws ${pyVersion}: bump both`);
  process.exit(1);
}
for (const name of ["fastws.js", "fastws.d.ts"]) {
  copyFileSync(join(src, name), join(here, name));
  console.log(`copied fastws/static/${name}`);
}

import assert from "node:assert/strict";
import { test } from "node:test";
import { cleanUrl, defaultServices, resolveServices } from "../src/config.js";

const page = { protocol: "http:", hostname: "127.0.0.1", search: "" };

test("by default the services are on the page's host, on etc/cim.ini's ports", () => {
  assert.deepEqual(defaultServices(page), {
    router: "http://127.0.0.1:8080",
    logic: "http://127.0.0.1:8081",
    files: "http://127.0.0.1:8082",
  });
  assert.equal(defaultServices({ protocol: "https:", hostname: "::1" }).router, "https://[::1]:8080");
});

test("the address's parameters come before what was stored, which comes before the defaults", () => {
  const stored = JSON.stringify({ router: "http://r.example:1/", logic: "javascript:alert(1)" });
  const services = resolveServices({ ...page, search: "?files=http://f.example:9/base/" }, stored);
  assert.equal(services.router, "http://r.example:1");
  assert.equal(services.logic, "http://127.0.0.1:8081");
  assert.equal(services.files, "http://f.example:9/base");
});

test("only http(s) URLs are taken; garbage in storage is ignored", () => {
  assert.equal(cleanUrl("ws://x"), undefined);
  assert.equal(cleanUrl("not a url"), undefined);
  assert.equal(resolveServices(page, "{not json").router, "http://127.0.0.1:8080");
});

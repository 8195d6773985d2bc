// The wire's records as the client hands them out (src/records.js): pure, no hub.

import assert from "node:assert/strict";
import { test } from "node:test";

import { agentInfo } from "../src/records.js";

const WIRE = {
  agent_id: "agt_1",
  name: "far",
  description: "",
  capabilities: [{ name: "echo", description: "", params_schema: null }],
  online: true,
  metadata: {},
  tags: [],
};

test("an agent another hub of the cluster holds says which", () => {
  assert.equal(agentInfo({ ...WIRE, hub: "east-2" }).hub, "east-2");
});

test("an agent of this hub has no hub field", () => {
  assert.equal("hub" in agentInfo(WIRE), false);
  assert.equal("hub" in agentInfo({ ...WIRE, hub: null }), false);
});

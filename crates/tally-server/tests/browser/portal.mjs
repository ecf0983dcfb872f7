// Drives the admin and customer portals in Debian's Chromium. Run by tests/browser.rs,
// which starts the server, prepares the data and passes it in the environment.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("TALLY_BASE");
const shots = env("TALLY_SCREENSHOTS");
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.TALLY_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = (text) => console.log(`browser: ${text}`);
const shot = (page, name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });

try {
  // ---- the admin ----
  const admin = await (await browser.newContext()).newPage();
  await admin.goto(`${base}/admin`);
  assert.match(admin.url(), /\/admin\/login$/);
  await shot(admin, "admin-sign-in");
  await admin.getByLabel("Admin API key").fill(env("TALLY_ADMIN_KEY"));
  await admin.getByRole("button", { name: "Sign in" }).click();
  await admin.getByRole("heading", { name: "Organizations" }).waitFor();
  await shot(admin, "admin-organizations");
  step("admin signed in");

  await admin.getByLabel("Search by name").fill("Browser Co");
  await admin.getByRole("button", { name: "Search" }).click();
  await admin.getByRole("link", { name: "Browser Co" }).click();
  await admin.getByRole("heading", { name: "Browser Co" }).waitFor();
  const wallet = env("TALLY_WALLET");
  const card = admin.locator(`section[data-wallet="${wallet}"]`);
  assert.equal(await card.locator('[data-figure="balance"]').textContent(), "0.00 USD");

  // Credit the wallet and see the new balance.
  await card.getByLabel("Direction").selectOption("credit");
  await card.getByLabel("Amount (USD)").first().fill("40");
  await card.getByLabel("Reason").first().fill("welcome credit");
  await card.getByRole("button", { name: "Apply adjustment" }).click();
  await admin.getByRole("status").filter({ hasText: "Credit of 40 USD applied." }).waitFor();
  const after = admin.locator(`section[data-wallet="${wallet}"]`);
  assert.equal(await after.locator('[data-figure="balance"]').textContent(), "40.00 USD");
  step("admin credited 40 USD");

  // A debit beyond available is refused with the API's message.
  await after.getByLabel("Direction").selectOption("debit");
  await after.getByLabel("Amount (USD)").first().fill("1000");
  await after.getByLabel("Reason").first().fill("too much");
  await after.getByRole("button", { name: "Apply adjustment" }).click();
  await admin.getByRole("status").filter({ hasText: "insufficient_funds" }).waitFor();
  step("admin debit beyond available refused");

  // Place a hold through the API, then release it in the portal.
  const hold = await (await fetch(`${base}/v1/wallets/${wallet}/holds`, {
    method: "POST",
    headers: { Authorization: `Bearer ${env("TALLY_ADMIN_KEY")}`, "Content-Type": "application/json", "Idempotency-Key": "browser-hold" },
    body: JSON.stringify({ amount: "15", currency: "USD", ttl_seconds: 600 }),
  })).json();
  assert.ok(hold.id, JSON.stringify(hold));
  await admin.reload();
  const held = admin.locator(`section[data-wallet="${wallet}"]`);
  assert.equal(await held.locator('[data-figure="available"]').textContent(), "25.00 USD");
  await shot(admin, "admin-wallets");
  await held.getByRole("button", { name: `Release hold ${hold.id}` }).click();
  await admin.getByRole("status").filter({ hasText: `Hold ${hold.id} released.` }).waitFor();
  assert.equal(await admin.locator(`section[data-wallet="${wallet}"] [data-figure="available"]`).textContent(), "40.00 USD");
  step("admin released a hold");

  // Approve the verification the organization submitted.
  await admin.getByRole("link", { name: "Verification and payouts" }).click();
  assert.equal(await admin.locator("[data-verification]").textContent(), "pending");
  await admin.getByRole("button", { name: "Approve verification" }).click();
  await admin.getByRole("status").filter({ hasText: "Verification approved." }).waitFor();
  assert.equal(await admin.locator("[data-verification]").textContent(), "verified");
  await shot(admin, "admin-verification");
  step("admin approved a verification");

  // A form posted without the session's CSRF token is refused.
  const forged = await admin.evaluate(async (path) => {
    const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" }, body: "direction=credit&amount=5&reason=x" });
    return response.status;
  }, `/admin/wallets/${wallet}/adjust`);
  assert.equal(forged, 403);
  step("form without CSRF token refused");

  // ---- the customer ----
  const link = env("TALLY_PORTAL_URL");
  const customer = await (await browser.newContext()).newPage();
  await customer.goto(link);
  await customer.getByRole("button", { name: "Open my wallets" }).click();
  assert.match(customer.url(), /\/portal$/);
  await customer.getByRole("heading", { name: "Wallets of Browser Co" }).waitFor();
  await shot(customer, "portal-wallets");
  await customer.getByRole("link", { name: "USD wallet" }).click();
  await customer.getByRole("heading", { name: "USD wallet" }).waitFor();

  await customer.getByLabel("Add a payment method").selectOption("pm_card_visa");
  await customer.getByRole("button", { name: "Add", exact: true }).click();
  await customer.getByRole("status").filter({ hasText: "Payment method added." }).waitFor();
  await customer.getByLabel("20.00 USD").check();
  await customer.getByRole("button", { name: "Review top-up" }).click();
  await customer.getByRole("heading", { name: "Review your top-up" }).waitFor();
  assert.equal(await customer.locator('[data-figure="total"]').textContent(), "22.00 USD");
  assert.ok((await customer.textContent("main")).includes("Sales tax"));
  await shot(customer, "portal-review-top-up");
  await customer.getByRole("button", { name: "Pay 22.00 USD" }).click();
  await customer.locator('[data-status="succeeded"]').waitFor();
  await customer.getByRole("heading", { name: /^Receipt R-/ }).waitFor();
  await shot(customer, "portal-receipt");
  step("customer topped up 20.00 USD (22.00 with tax) and sees the receipt");

  await customer.getByRole("link", { name: "Back to the wallet" }).click();
  assert.equal(await customer.locator('[data-figure="balance"]').textContent(), "60.00 USD");
  const movements = await customer.locator("table").filter({ hasText: "Balance after" }).textContent();
  assert.ok(movements.includes("top_up") && movements.includes("20.00 USD"), movements);
  await shot(customer, "portal-wallet");
  step("customer sees the top-up movement");

  // Another organization's wallet is not there for this customer.
  const other = await customer.goto(`${base}/portal/wallets/${env("TALLY_OTHER_WALLET")}`);
  assert.equal(other.status(), 404);

  // The link does not work a second time.
  const second = await (await browser.newContext()).newPage();
  await second.goto(link);
  const [again] = await Promise.all([
    second.waitForResponse((r) => r.url().endsWith("/portal/enter") && r.request().method() === "POST"),
    second.getByRole("button", { name: "Open my wallets" }).click(),
  ]);
  assert.equal(again.status(), 403);
  assert.ok((await second.textContent("main")).includes("already been used"));
  step("second use of the link refused; other organization's wallet 404");
} finally {
  await browser.close();
}
console.log("browser: all steps passed");

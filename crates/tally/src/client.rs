//! The API client subcommands: organizations, wallets, adjustments, holds, transfers,
//! movements, and usage billing (catalog, subscriptions, usage, access checks,
//! summaries, statements), over HTTP with a key from the environment.

use anyhow::Context;
use rand::RngCore;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The server's base URL.
    #[arg(long, env = "TALLY_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// The API key (tly_...).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Print the JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The Idempotency-Key for money-moving commands (a random one by default).
    #[arg(long, global = true)]
    idempotency_key: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum ClientCommand {
    /// Create an organization (admin key).
    OrgCreate {
        name: String,
        #[arg(long)]
        merchant: bool,
    },
    /// List organizations (admin key).
    Orgs,
    /// Get or create an organization's wallet in a currency.
    WalletCreate {
        organization: String,
        #[arg(long)]
        currency: String,
    },
    /// Show a wallet: balance, held, available, grants.
    Wallet { wallet: String },
    /// Credit or debit a wallet (admin key).
    Adjust {
        wallet: String,
        /// credit or debit
        direction: String,
        amount: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        reason: String,
    },
    /// Place a hold.
    Hold {
        wallet: String,
        amount: String,
        #[arg(long)]
        currency: String,
        #[arg(long, default_value_t = 300)]
        ttl_seconds: i64,
    },
    /// Capture a hold into a wallet, all or part.
    Capture {
        hold: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        amount: Option<String>,
    },
    /// Release a hold.
    Release { hold: String },
    /// Transfer between wallets.
    Transfer {
        from: String,
        to: String,
        amount: String,
        #[arg(long)]
        currency: String,
    },
    /// A wallet's movements, newest first.
    Movements {
        wallet: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Create a product (merchant key, or admin with --merchant).
    ProductCreate {
        name: String,
        #[arg(long)]
        merchant: Option<String>,
    },
    /// Create a meter (merchant key, or admin with --merchant).
    MeterCreate {
        code: String,
        #[arg(long)]
        unit: String,
        /// sum or count
        #[arg(long, default_value = "sum")]
        aggregation: String,
        #[arg(long)]
        product: Option<String>,
        #[arg(long)]
        merchant: Option<String>,
    },
    /// Create a plan from a JSON file with the body of POST /v1/plans.
    PlanCreate { file: std::path::PathBuf },
    /// Subscribe a consumer to a plan.
    Subscribe {
        consumer: String,
        #[arg(long)]
        plan: String,
    },
    /// Report one usage event (merchant key); the event id defaults to a random one.
    Usage {
        consumer: String,
        #[arg(long)]
        meter: String,
        #[arg(long)]
        quantity: String,
        #[arg(long)]
        event_id: Option<String>,
        /// Event properties, as name=value (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
    },
    /// Can a consumer afford this usage now (merchant key)?
    AccessCheck {
        consumer: String,
        #[arg(long)]
        meter: String,
        #[arg(long)]
        quantity: String,
    },
    /// A subscription's usage summary for the current period.
    UsageSummary { subscription: String },
    /// A wallet statement for [from, until) (RFC 3339).
    Statement {
        wallet: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        until: String,
    },
    /// Top up a wallet through the payment provider (taxes are added).
    TopUp {
        wallet: String,
        amount: String,
        #[arg(long)]
        payment_method: Option<String>,
    },
    /// A one-time customer portal link for a consumer organization (admin key, or a
    /// merchant the consumer subscribes to).
    PortalLink { organization: String },
    /// Organization verification: submit (default), or as the platform --approve or
    /// --reject REASON.
    VerifyOrg {
        organization: String,
        #[arg(long)]
        approve: bool,
        #[arg(long)]
        reject: Option<String>,
    },
    /// Add an external bank account: --iban, or (US) --routing-number and --account-number.
    BankAccountAdd {
        organization: String,
        #[arg(long)]
        country: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        iban: Option<String>,
        #[arg(long)]
        routing_number: Option<String>,
        #[arg(long)]
        account_number: Option<String>,
    },
    /// Verify a bank account: as the platform directly, or --send-deposits, or
    /// --deposits A,B to confirm the two test deposits.
    BankAccountVerify {
        account: String,
        #[arg(long)]
        send_deposits: bool,
        #[arg(long)]
        deposits: Option<String>,
    },
    /// Pay out from a wallet to a verified bank account.
    Payout {
        wallet: String,
        amount: String,
        #[arg(long)]
        bank_account: String,
    },
}

pub fn run(args: ClientArgs, command: ClientCommand) -> anyhow::Result<()> {
    let key = args.key.clone().context("set TALLY_API_KEY (or --key) to an API key")?;
    let idempotency = args.idempotency_key.clone().unwrap_or_else(|| {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        format!("cli-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    });
    let (method, path, body, moves_money) = match command {
        ClientCommand::OrgCreate { name, merchant } => (
            "POST",
            "/v1/organizations".to_string(),
            Some(json!({"name": name, "roles": {"merchant": merchant, "consumer": !merchant}})),
            false,
        ),
        ClientCommand::Orgs => ("GET", "/v1/organizations".to_string(), None, false),
        ClientCommand::WalletCreate { organization, currency } => {
            ("POST", format!("/v1/organizations/{organization}/wallets"), Some(json!({"currency": currency})), false)
        }
        ClientCommand::Wallet { wallet } => ("GET", format!("/v1/wallets/{wallet}"), None, false),
        ClientCommand::Adjust { wallet, direction, amount, currency, reason } => (
            "POST",
            format!("/v1/wallets/{wallet}/adjustments"),
            Some(json!({"direction": direction, "amount": amount, "currency": currency, "reason": reason})),
            true,
        ),
        ClientCommand::Hold { wallet, amount, currency, ttl_seconds } => (
            "POST",
            format!("/v1/wallets/{wallet}/holds"),
            Some(json!({"amount": amount, "currency": currency, "ttl_seconds": ttl_seconds})),
            true,
        ),
        ClientCommand::Capture { hold, to, amount } => {
            let mut body = json!({"to_wallet": to});
            if let Some(amount) = amount {
                body["amount"] = amount.into();
            }
            ("POST", format!("/v1/holds/{hold}/capture"), Some(body), true)
        }
        ClientCommand::Release { hold } => ("POST", format!("/v1/holds/{hold}/release"), Some(json!({})), true),
        ClientCommand::Transfer { from, to, amount, currency } => (
            "POST",
            "/v1/transfers".to_string(),
            Some(json!({"from_wallet": from, "to_wallet": to, "amount": amount, "currency": currency})),
            true,
        ),
        ClientCommand::Movements { wallet, limit } => {
            ("GET", format!("/v1/wallets/{wallet}/movements?limit={limit}"), None, false)
        }
        ClientCommand::ProductCreate { name, merchant } => {
            ("POST", "/v1/products".to_string(), Some(json!({"name": name, "merchant": merchant})), false)
        }
        ClientCommand::MeterCreate { code, unit, aggregation, product, merchant } => (
            "POST",
            "/v1/meters".to_string(),
            Some(
                json!({"code": code, "unit": unit, "aggregation": aggregation, "product": product, "merchant": merchant}),
            ),
            false,
        ),
        ClientCommand::PlanCreate { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let body: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            ("POST", "/v1/plans".to_string(), Some(body), false)
        }
        ClientCommand::Subscribe { consumer, plan } => {
            ("POST", "/v1/subscriptions".to_string(), Some(json!({"consumer": consumer, "plan": plan})), false)
        }
        ClientCommand::Usage { consumer, meter, quantity, event_id, properties } => {
            let mut map = serde_json::Map::new();
            for property in properties {
                let (name, value) =
                    property.split_once('=').with_context(|| format!("--property {property}: use name=value"))?;
                map.insert(name.to_string(), value.into());
            }
            let body = json!({"event_id": event_id.unwrap_or_else(|| idempotency.clone()), "consumer": consumer,
                              "meter": meter, "quantity": quantity, "properties": map});
            ("POST", "/v1/usage".to_string(), Some(body), false)
        }
        ClientCommand::AccessCheck { consumer, meter, quantity } => (
            "POST",
            "/v1/access-checks".to_string(),
            Some(json!({"consumer": consumer, "meter": meter, "quantity": quantity})),
            false,
        ),
        ClientCommand::UsageSummary { subscription } => {
            ("GET", format!("/v1/subscriptions/{subscription}/usage"), None, false)
        }
        ClientCommand::Statement { wallet, from, until } => {
            ("GET", format!("/v1/wallets/{wallet}/statement?from={from}&until={until}"), None, false)
        }
        ClientCommand::TopUp { wallet, amount, payment_method } => (
            "POST",
            format!("/v1/wallets/{wallet}/top-ups"),
            Some(json!({"amount": amount, "payment_method": payment_method})),
            true,
        ),
        ClientCommand::PortalLink { organization } => {
            ("POST", "/v1/portal-sessions".to_string(), Some(json!({"organization": organization})), false)
        }
        ClientCommand::VerifyOrg { organization, approve, reject } => match (approve, reject) {
            (true, None) => {
                ("POST", format!("/v1/organizations/{organization}/verification/approve"), Some(json!({})), false)
            }
            (false, Some(reason)) => (
                "POST",
                format!("/v1/organizations/{organization}/verification/reject"),
                Some(json!({"reason": reason})),
                false,
            ),
            (false, None) => {
                ("POST", format!("/v1/organizations/{organization}/verification/submit"), Some(json!({})), false)
            }
            (true, Some(_)) => anyhow::bail!("give --approve or --reject, not both"),
        },
        ClientCommand::BankAccountAdd {
            organization,
            country,
            currency,
            holder,
            iban,
            routing_number,
            account_number,
        } => (
            "POST",
            format!("/v1/organizations/{organization}/bank-accounts"),
            Some(json!({"country": country, "currency": currency, "holder_name": holder, "iban": iban,
                        "routing_number": routing_number, "account_number": account_number})),
            false,
        ),
        ClientCommand::BankAccountVerify { account, send_deposits, deposits } => match (send_deposits, deposits) {
            (true, None) => ("POST", format!("/v1/bank-accounts/{account}/test-deposits"), Some(json!({})), false),
            (false, Some(deposits)) => {
                let amounts: Vec<&str> = deposits.split(',').map(str::trim).collect();
                (
                    "POST",
                    format!("/v1/bank-accounts/{account}/test-deposits/confirm"),
                    Some(json!({"amounts": amounts})),
                    false,
                )
            }
            (false, None) => ("POST", format!("/v1/bank-accounts/{account}/verify"), Some(json!({})), false),
            (true, Some(_)) => anyhow::bail!("give --send-deposits or --deposits, not both"),
        },
        ClientCommand::Payout { wallet, amount, bank_account } => (
            "POST",
            "/v1/payouts".to_string(),
            Some(json!({"wallet": wallet, "amount": amount, "bank_account": bank_account})),
            true,
        ),
    };
    let client = reqwest::blocking::Client::new();
    let mut request =
        client.request(method.parse()?, format!("{}{}", args.url.trim_end_matches('/'), path)).bearer_auth(key);
    if moves_money {
        request = request.header("Idempotency-Key", &idempotency);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().with_context(|| format!("calling {}", args.url))?;
    let status = response.status();
    let answer: Value = response.json().unwrap_or(Value::Null);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print_table(&answer);
    }
    if !status.is_success() {
        // The answer above already says what went wrong; exit non-zero for scripts.
        eprintln!("error: {} {}", status.as_u16(), answer["code"].as_str().unwrap_or("error"));
        std::process::exit(1);
    }
    Ok(())
}

fn cell(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        Value::Array(items) => format!("[{}]", items.len()),
        other => other.to_string(),
    }
}

/// Lists print one row per item; objects print one field per line.
fn print_table(answer: &Value) {
    if let Some(items) = answer["data"].as_array() {
        let Some(first) = items.first().and_then(Value::as_object) else {
            println!("(none)");
            return;
        };
        let columns: Vec<&String> = first.keys().filter(|k| *k != "object").collect();
        println!("{}", columns.iter().map(|c| c.as_str()).collect::<Vec<_>>().join("\t"));
        for item in items {
            println!("{}", columns.iter().map(|c| cell(&item[c.as_str()])).collect::<Vec<_>>().join("\t"));
        }
    } else if let Some(object) = answer.as_object() {
        for (field, value) in object {
            println!("{field:<16} {}", cell(value));
        }
    }
}

-- Example orders for examples/support-router.toml.
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    carrier TEXT NOT NULL,
    eta TEXT NOT NULL,
    total REAL NOT NULL,
    refundable INTEGER NOT NULL
);
INSERT OR REPLACE INTO orders VALUES
    ('12345', 'delayed in transit', 'DHL', '2026-12-03', 59.90, 1),
    ('12346', 'out for delivery', 'UPS', 'today', 19.00, 0),
    ('12347', 'delivered', 'DPD', '2026-11-20', 120.00, 1);

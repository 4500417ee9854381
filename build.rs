// sqlx embeds the migrations at compile time; without this a new migration file is not seen.
fn main() {
    println!("cargo:rerun-if-changed=src/store/migrations");
}

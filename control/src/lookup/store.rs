//! Where records live: an embedded redb database (one machine, the default) or etcd (a
//! cluster of lookup services sharing one store: `--etcd-endpoints`, or `--new-etcd-cluster`
//! and `--etcd-ip`, see [`super::etcd`]). Values are the records' JSON.

use std::{path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");

/// A failed record store operation, with the reason (redb's or etcd's error, as text).
#[derive(Debug, thiserror::Error)]
#[error("record store: {0}")]
pub struct StoreError(pub String);

fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The record store of a lookup service.
#[derive(Clone)]
pub enum Store {
    /// A redb file on this machine, the default.
    Embedded(EmbeddedStore),
    /// An etcd cluster, shared by every lookup service that uses it.
    #[cfg(feature = "etcd")]
    // Boxed: the etcd client is large and the store is moved around by value.
    Etcd(Box<super::etcd::EtcdStore>),
}

impl Store {
    /// Stores `value` (a record's JSON) as the record of `name`, replacing any.
    pub async fn put(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Self::Embedded(store) => store.put(name.to_owned(), value).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.put(name, value).await,
        }
    }

    /// The value stored for `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Self::Embedded(store) => store.get(name.to_owned()).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.get(name).await,
        }
    }

    /// Every (name, value), sorted by name.
    pub async fn list(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Self::Embedded(store) => store.list().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.list().await,
        }
    }

    /// Deletes `name`; returns how many records went (0 or 1).
    pub async fn delete(&self, name: &str) -> Result<u64, StoreError> {
        match self {
            Self::Embedded(store) => store.delete(name.to_owned()).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.delete(name).await,
        }
    }
}

/// Records in a redb file: ACID, crash-safe, no server.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl EmbeddedStore {
    /// Opens the database file at `path`, creating it and its table of records if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        // Create the table up front so reads of an empty store find it.
        let txn = db.begin_write().map_err(store_error)?;
        txn.open_table(SERVICES).map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs a blocking database operation off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(store_error)?
    }

    async fn put(&self, name: String, value: Vec<u8>) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(store_error)?;
            txn.open_table(SERVICES)
                .map_err(store_error)?
                .insert(name.as_str(), value.as_slice())
                .map_err(store_error)?;
            txn.commit().map_err(store_error)
        })
        .await
    }

    async fn get(&self, name: String) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(store_error)?;
            let table = txn.open_table(SERVICES).map_err(store_error)?;
            Ok(table
                .get(name.as_str())
                .map_err(store_error)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn list(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(store_error)?;
            let table = txn.open_table(SERVICES).map_err(store_error)?;
            table
                .iter()
                .map_err(store_error)?
                .map(|item| {
                    let (k, v) = item.map_err(store_error)?;
                    Ok((k.value().to_owned(), v.value().to_vec()))
                })
                .collect()
        })
        .await
    }

    async fn delete(&self, name: String) -> Result<u64, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(store_error)?;
            let removed = txn
                .open_table(SERVICES)
                .map_err(store_error)?
                .remove(name.as_str())
                .map_err(store_error)?
                .is_some();
            txn.commit().map_err(store_error)?;
            Ok(u64::from(removed))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lookup.redb");
        let store = Store::Embedded(EmbeddedStore::open(&path).unwrap());
        assert_eq!(store.get("a").await.unwrap(), None);
        store.put("b", b"2".to_vec()).await.unwrap();
        store.put("a", b"1".to_vec()).await.unwrap();
        store.put("a", b"1!".to_vec()).await.unwrap();
        drop(store);
        let store = Store::Embedded(EmbeddedStore::open(&path).unwrap());
        assert_eq!(store.get("a").await.unwrap(), Some(b"1!".to_vec()));
        let names: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(store.delete("a").await.unwrap(), 1);
        assert_eq!(store.delete("a").await.unwrap(), 0);
        assert_eq!(store.list().await.unwrap().len(), 1);
    }
}
